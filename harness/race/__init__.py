"""Race engine: vCPU toucher threads against host disruptor threads, with data oracles."""
