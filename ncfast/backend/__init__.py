"""The kernel layer under the measuring library.

- :mod:`ncfast.backend.ops`: the one switch between the native extension and the reference
  (``NCFAST_BACKEND=reference|native``); the library calls only this.
- :mod:`ncfast.backend.reference`: pure-torch float64 implementations of every op, the tests'
  oracle and the benchmarks' baseline.
- :mod:`ncfast.backend.native`: the compiled ops of ``ncfast._C`` (``csrc/``) behind the
  reference's signatures.
- :mod:`ncfast.backend.build_info`: how the extension was built (``ncfast info``).

Imports torch only; never the reproduction app (:mod:`ncfast.paper`), the reports or the CLI.
"""
