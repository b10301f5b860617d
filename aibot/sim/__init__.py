"""Simulated LLM servers (LM Studio, llama.cpp, Ollama, OpenAI-compatible) for tests, the demo and capacity
planning. See docs/simulator.md."""

from aibot.sim.catalog import GB, ModelSpec, default_catalog, uniform_catalog
from aibot.sim.cluster import ClusterSpec, SimCluster, seed_spec, start_cluster
from aibot.sim.config import SimConfig, SimConfigError
from aibot.sim.faults import FaultConfig
from aibot.sim.server import SimServer

__all__ = ["GB", "ClusterSpec", "FaultConfig", "ModelSpec", "SimCluster", "SimConfig", "SimConfigError",
           "SimServer", "default_catalog", "seed_spec", "start_cluster", "uniform_catalog"]
