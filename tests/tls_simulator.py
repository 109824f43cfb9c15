"""The simulator in OpenAI mode over TLS with HTTP/2 (hypercorn): ``python -m tests.tls_simulator PORT CERT KEY``."""

import asyncio
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config

from inference_core.simulator import SimulatorConfig, create_simulator

port, certfile, keyfile = sys.argv[1:4]
config = Config()
config.bind = [f"127.0.0.1:{port}"]
config.certfile = certfile
config.keyfile = keyfile
config.alpn_protocols = ["h2", "http/1.1"]
config.loglevel = "WARNING"
asyncio.run(serve(create_simulator(SimulatorConfig(mode="openai", model="gpt-4o")), config))  # type: ignore[arg-type]
