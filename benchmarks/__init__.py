"""Side-by-side benchmarks: deltatune vs peft vs the cost floor (see benchmarks/README.md)."""
