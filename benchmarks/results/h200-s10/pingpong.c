#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <time.h>
#include <sched.h>
static inline uint64_t ns(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1000000000ull+t.tv_nsec;}
#define L 64
/* layout: dir d (0 req, 1 rep): seq line at base+d*4096, payload lines at base+d*4096+L.. ; reader-ack line at +2048 */
static void pin(int c){ if(c<0)return; cpu_set_t s;CPU_ZERO(&s);CPU_SET(c,&s);sched_setaffinity(0,sizeof s,&s);}
int main(int argc,char**argv){
  int mode=atoi(argv[1]); int n=atoi(argv[2]); int ca=atoi(argv[3]), cb=atoi(argv[4]);
  char*m=mmap(0,1<<16,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_ANONYMOUS,-1,0);
  memset(m,0,1<<16);
  int nlines = mode==1?0:(mode==2?1:2);
  pid_t p=fork();
  int me = p==0;  /* child = worker */
  pin(me?cb:ca);
  char*in=m+(me?0:1)*4096, *out=m+(me?1:0)*4096;
  char buf[256]; memset(buf,7,sizeof buf);
  uint64_t*lat=me?NULL:malloc(sizeof(uint64_t)*n);
  for(uint64_t i=1;i<=(uint64_t)n;i++){
    uint64_t t0=ns();
    if(!me){ /* driver: send then wait */
      if(mode==1){memcpy(out+8,buf,40);} else {memcpy(out+L,buf,nlines*L);} 
      __atomic_store_n((uint64_t*)out,i,__ATOMIC_RELEASE);
      while(__atomic_load_n((uint64_t*)in,__ATOMIC_ACQUIRE)<i) __builtin_ia32_pause();
      if(mode==1) memcpy(buf,in+8,40); else memcpy(buf,in+L,nlines*L);
      if(mode==3) __atomic_store_n((uint64_t*)(in+2048),i,__ATOMIC_RELEASE);
      lat[i-1]=ns()-t0;
    } else {
      while(__atomic_load_n((uint64_t*)in,__ATOMIC_ACQUIRE)<i) __builtin_ia32_pause();
      if(mode==1) memcpy(buf,in+8,40); else memcpy(buf,in+L,nlines*L);
      if(mode==3) __atomic_store_n((uint64_t*)(in+2048),i,__ATOMIC_RELEASE);
      if(mode==1){memcpy(out+8,buf,40);} else {memcpy(out+L,buf,nlines*L);}
      __atomic_store_n((uint64_t*)out,i,__ATOMIC_RELEASE);
    }
  }
  if(me) return 0;
  wait(NULL);
  int cmp(const void*a,const void*b){uint64_t x=*(uint64_t*)a,y=*(uint64_t*)b;return x<y?-1:x>y;}
  qsort(lat,n,8,cmp);
  printf("mode %d cores %d,%d: p50 %lu ns p90 %lu ns\n",mode,ca,cb,lat[n/2],lat[n*9/10]);
  return 0;
}
