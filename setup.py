"""The compiled core: the ring core (gpuexec/ipc/_ringcore.c) and the call table's hot
steps (gpuexec/executor/_calltable.c), optional extensions.

Built against Python's limited API (one abi3 build for every CPython >= 3.10) with the C
compiler and Python headers of the machine (Debian/Ubuntu: ``build-essential
python3-dev``). When it cannot be built, the install goes on without it (``optional``)
and gpuexec runs its pure-Python twin, saying so in one log line; ``gpuexec doctor``
shows which one runs. Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            name,
            [source],
            # shared by both: the ring's layout; plain msgpack data; the wait for replies
            depends=["gpuexec/ipc/_ring.h", "gpuexec/ipc/_plain.h", "gpuexec/ipc/_collect.h"],
            define_macros=[("Py_LIMITED_API", "0x030A0000")],
            extra_compile_args=["-O2", "-std=gnu11"],
            py_limited_api=True,
            optional=True,
        )
        for name, source in (("gpuexec.ipc._ringcore", "gpuexec/ipc/_ringcore.c"),
                             ("gpuexec.executor._calltable", "gpuexec/executor/_calltable.c"))
    ],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
