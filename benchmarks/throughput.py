"""Moved: `pagedllm bench throughput` (same flags); its workload is pagedllm.entrypoints.bench.workload.make_workload."""
raise SystemExit("benchmarks/throughput.py is now `pagedllm bench throughput` (same flags): see README, Benchmarks")
