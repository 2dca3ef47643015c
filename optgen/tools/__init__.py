"""Commands built on top of the compiler and the runtime: the benchmarks (``optgen bench``), the
verification table (``optgen verify``) and the fuzzer (``optgen fuzz``).  Nothing in the compiler
or the runtime imports them."""
