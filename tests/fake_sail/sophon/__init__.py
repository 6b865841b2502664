"""The tests' stand-in for Sophgo's `sophon` package: only `sophon.sail`, emulated on the CPU."""
