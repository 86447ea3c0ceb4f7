"""Load-testing benchmark: reference servers, load generator, in-process floor, orchestration, GPU check."""
