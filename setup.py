from setuptools import Extension, setup

setup(
    cffi_modules=["csrc/build_native.py:ffibuilder"],
    # the per-call path of the mmap-backed reads (pyqcow/guestmap.py); optional
    # like pyqcow._native: without it the reads go through cffi
    ext_modules=[
        Extension(
            "pyqcow._mapread",
            ["csrc/pyqcow_mapread.c"],
            py_limited_api=True,
            define_macros=[("Py_LIMITED_API", "0x030B0000")],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
            optional=True,
        )
    ],
)
