"""Speed and memory of miss_backend and the exporter against PEFT, LoRA and the limit.

Run `python -m benchmarks` (all tables at the sizes the benchmarks issue names) or
`python -m benchmarks --quick` (every table on tiny sizes, in under two minutes).
"""
