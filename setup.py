"""Build script. The native extension ncfast._C is added by the kernels work (csrc/)."""

from setuptools import setup

setup()
