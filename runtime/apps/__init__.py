"""What is built on the library: the `corral` command line (cli), the control socket of
`corral run` (control), the demo, the chaos run, the benchmarks and base-image building."""
