"""Builds kernels._C: CUDAExtension when torch has CUDA and nvcc exists, else CppExtension."""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension as ext


def _cuda_build() -> bool:
    import torch
    return torch.version.cuda is not None and ext.CUDA_HOME is not None and os.environ.get("GPT_ENGINE_CPU_ONLY") != "1"


here = os.path.dirname(os.path.abspath(__file__))
cpp = sorted(glob.glob("csrc/*.cpp"))
cu = sorted(glob.glob("csrc/*.cu"))
# -fopenmp: without it at::parallel_for in the CPU kernels runs on one thread
cxx, link = ["-O3", "-std=c++17", "-fopenmp"], ["-fopenmp"]

if _cuda_build():
    module = ext.CUDAExtension(
        "kernels._C", cpp + cu, include_dirs=[os.path.join(here, "csrc")],
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17",
                                                 "-gencode", "arch=compute_90a,code=sm_90a",
                                                 "-gencode", "arch=compute_80,code=sm_80"]},
        extra_link_args=link)
else:
    module = ext.CppExtension("kernels._C", cpp, include_dirs=[os.path.join(here, "csrc")],
                              extra_compile_args={"cxx": cxx}, extra_link_args=link)

setup(ext_modules=[module], cmdclass={"build_ext": ext.BuildExtension.with_options(use_ninja=True)})
