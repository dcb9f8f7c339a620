"""The runtime: engine facade, scheduler, runner, sampling, agent loop."""
