"""Builds gpt_engine.kernels._C: CUDAExtension when torch has CUDA and nvcc exists, else CppExtension."""
import glob
import importlib.util
import os

from setuptools import setup
from torch.utils import cpp_extension as ext


def _cuda_build() -> bool:
    import torch
    cpu_only = os.environ.get("GPT_ENGINE_CPU_ONLY") == "1" or os.environ.get("GPT_ENGINE_SANITIZE") == "1"
    return torch.version.cuda is not None and ext.CUDA_HOME is not None and not cpu_only


def _cutlass_include() -> list[str]:
    """CUTLASS's header dirs from the nvidia-cutlass package (`make cutlass`), or [] without it."""
    spec = importlib.util.find_spec("cutlass_library")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return []
    src = os.path.join(list(spec.submodule_search_locations)[0], "source")
    dirs = [os.path.join(src, "include"), os.path.join(src, "tools", "util", "include")]
    return dirs if all(os.path.isdir(d) for d in dirs) else []


here = os.path.dirname(os.path.abspath(__file__))
cpp = sorted(glob.glob("csrc/*.cpp"))
cu = sorted(glob.glob("csrc/*.cu"))
# -fopenmp: without it at::parallel_for in the CPU kernels runs on one thread
cxx, link = ["-O3", "-std=c++17", "-fopenmp"], ["-fopenmp"]
if os.environ.get("GPT_ENGINE_SANITIZE") == "1":  # `make sanitize`: ASan + UBSan, CPU only, into build/sanitize
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    cxx, link = ["-O1", "-g", "-std=c++17", "-fopenmp"] + san, ["-fopenmp"] + san

if _cuda_build():
    # the Hopper GEMMs (gemm_sm90_*.cu) need CUTLASS; without it gemm.cu's mma.sync kernel serves alone
    cutlass = _cutlass_include()
    if not cutlass:
        cu = [f for f in cu if not os.path.basename(f).startswith("gemm_sm90")]
        print("setup.py: CUTLASS headers not found (make cutlass): building without the sm90 GEMMs")
    module = ext.CUDAExtension(
        "gpt_engine.kernels._C", cpp + cu, include_dirs=[os.path.join(here, "csrc")] + cutlass,
        define_macros=[("WITH_CUDA", None)] + ([("GPT_ENGINE_CUTLASS", None)] if cutlass else []),
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-DNDEBUG",  # CUTLASS asserts break wgmma overlap
                                                 "-gencode", "arch=compute_90a,code=sm_90a",
                                                 "-gencode", "arch=compute_80,code=sm_80"]},
        extra_link_args=link)
else:
    module = ext.CppExtension("gpt_engine.kernels._C", cpp, include_dirs=[os.path.join(here, "csrc")],
                              extra_compile_args={"cxx": cxx}, extra_link_args=link)

setup(ext_modules=[module], cmdclass={"build_ext": ext.BuildExtension.with_options(use_ninja=True)})
