"""The package's compiled parts, both optional (pyproject.toml holds everything else).

- nnvitals._kernel (C, _kernel.c): a sampled step's statistics on the CPU in one call, and the forward hook's
  common case. Without a C compiler the statistics are computed with torch ops.
- nnvitals._autograd (C++, _autograd.cpp, against the headers and libraries of the torch it is built with, a build
  requirement): tensor addresses and gradient hooks without torch's Python bindings, lent to the kernel. Without it
  (no C++ compiler) the kernel takes them through torch's Python API.
"""

from setuptools import Extension, setup

KERNEL_FLAGS = ["-O3", "-fopenmp-simd", "-ffp-contract=off"]  # (benchmarks/ab.py builds another revision's with them)
LENT = ["src/nnvitals/_autograd.h"]  # what the C++ part lends the kernel, included by both
modules = [Extension("nnvitals._kernel", ["src/nnvitals/_kernel.c"], depends=LENT, optional=True,
                     extra_compile_args=KERNEL_FLAGS)]
try:
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths
except ImportError:  # pragma: no cover - a build without isolation, in an environment without torch
    pass
else:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    modules.append(Extension(
        "nnvitals._autograd", ["src/nnvitals/_autograd.cpp"], depends=LENT, optional=True, language="c++",
        include_dirs=include_paths(), library_dirs=library_paths(),
        libraries=["c10", "torch", "torch_cpu", "torch_python"],
        extra_compile_args=["-std=c++17", "-O2", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]))

setup(ext_modules=modules)
