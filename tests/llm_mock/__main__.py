import argparse

import uvicorn

from tests.llm_mock.server import app

parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
args = parser.parse_args()
uvicorn.run(app(), host=args.host, port=args.port, log_level="warning")
