"""Copy vLLM's shared-memory ``MessageQueue`` out of a vLLM install, for
``hot_path.py --vllm-path`` on a host without vLLM (a lent GPU host).

``vllm/distributed/device_communicators/shm_broadcast.py`` is copied unchanged; the
handful of vLLM modules it imports are replaced by the few names it uses from them
(``sched_yield`` is vLLM's own code; the logger, the platform and the network helpers
are only touched to create the queue, never on its hot path). Usage:
``python benchmarks/copy_vllm_shm.py --vllm-venv .venv-vllm`` (writes
``benchmarks/out/vllm_shm``).
"""

from __future__ import annotations

import glob
import shutil
import sys
from pathlib import Path

from _common import OUT, arg_parser

STUBS = {
    "vllm/__init__.py": "",
    "vllm/distributed/__init__.py": "",
    "vllm/distributed/device_communicators/__init__.py": "",
    "vllm/envs.py": (
        "import tempfile\n"
        "VLLM_USE_SPINLOOP_EXT = False\n"
        "VLLM_RINGBUFFER_WARNING_INTERVAL = 60\n"
        "VLLM_RPC_BASE_PATH = tempfile.gettempdir()\n"
        "VLLM_HOST_IP = ''\n"),
    "vllm/logger.py": "import logging\ninit_logger = logging.getLogger\n",
    "vllm/platforms/__init__.py": "current_platform = None  # used by process groups only\n",
    "vllm/distributed/utils.py": (
        "import os, sys, time\n"
        "USE_SCHED_YIELD = sys.version_info[:3] >= (3, 11, 1)  # vLLM's own choice\n\n"
        "def sched_yield():\n"
        "    if USE_SCHED_YIELD:\n"
        "        os.sched_yield()\n"
        "    else:\n"
        "        time.sleep(0)\n\n"
        "class StatelessProcessGroup:  # a type annotation only here\n"
        "    pass\n"),
    "vllm/utils/__init__.py": "",
    "vllm/utils/cpu_resource_utils.py": (
        "def check_cgroup_memory_available(required_bytes, allocation_name):\n"
        "    return None  # vLLM only logs here\n"),
    "vllm/utils/network_utils.py": (
        "import ipaddress\nfrom uuid import uuid4\nimport vllm.envs as envs\n\n"
        "def get_ip():\n    return '127.0.0.1'\n\n"
        "def get_open_zmq_ipc_path():\n"
        "    return f'ipc://{envs.VLLM_RPC_BASE_PATH}/{uuid4()}'\n\n"
        "def get_open_zmq_inproc_path():\n    return f'inproc://{uuid4()}'\n\n"
        "def is_valid_ipv6_address(address):\n"
        "    try:\n        ipaddress.IPv6Address(address)\n        return True\n"
        "    except ValueError:\n        return False\n"),
}


def main() -> int:
    ap = arg_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-venv", default=".venv-vllm", help="a venv with vLLM installed")
    ap.add_argument("--out", default=str(OUT / "vllm_shm"), metavar="DIR",
                    help="directory to write the package into")
    args = ap.parse_args()
    found = glob.glob(f"{args.vllm_venv}/lib/python3*/site-packages/vllm/distributed/"
                      "device_communicators/shm_broadcast.py")
    if not found:
        print(f"no vLLM in {args.vllm_venv} (make test-vllm builds one)", file=sys.stderr)
        return 1
    out = Path(args.out)
    for rel, text in STUBS.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    shutil.copy(found[0], out / "vllm/distributed/device_communicators/shm_broadcast.py")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
