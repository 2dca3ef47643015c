"""Differential testing of the compiler with random valid specs (Csmith / YARPGen style).

- :mod:`optgen.tools.fuzz.generate`: a random *valid* spec from a seed, covering the spec language;
- :mod:`optgen.tools.fuzz.evaluate`: the rule executed as plain Python on torch tensors — a second
  reference, independent of optgen's IR, passes and interpreter;
- :mod:`optgen.tools.fuzz.run`: builds random specs into a throw-away package, runs every
  implementation for every flag combination and compares it with the reference interpreter and
  with the evaluator; writes a failing spec to a file (``optgen fuzz``).
"""
