"""Fuzz the live app's OpenAPI document with schemathesis, with a larger budget than CI's tests/test_fuzz.py.

Starts an embedded Ray in this process, deploys the default app with an API key (a random one, never
printed; curl commands show it as $LLMSERVE_NB_API_KEY), or fuzzes `--url` (then give the key in
$LLMSERVE_NB_API_KEY). Every operation gets `--examples` generated requests per generation mode
(valid and invalid data); each answer must not be a 5xx and must match the document (status code,
content type, body schema, headers). Prints one row per operation and mode, then each finding with a
curl command that reproduces it; exits 1 when there is a finding.

    python benchmarks/fuzz.py [--examples 200] [--modes positive,negative] [--url http://127.0.0.1:8000]
        [--json findings.json]

Smoke: `python benchmarks/fuzz.py --examples 5`.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

# The fuzzer is a test tool (tests/openapi_fuzz.py, what CI's tests/test_fuzz.py runs); this script is the
# same fuzzer with a larger budget, so it imports it from there rather than keep a second copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from openapi_fuzz import fuzz_openapi  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=200, help="generated requests per operation and mode")
    p.add_argument("--modes", default="positive,negative")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    p.add_argument("--max-tokens-cap", type=int, default=8,
                   help="generated max_tokens between this and the server's limit are lowered to it (0: keep)")
    p.add_argument("--url", help="fuzz this running app instead of deploying one")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())

    cluster = None
    if args.url:
        base_url, api_key = args.url.rstrip("/"), os.environ.get("LLMSERVE_NB_API_KEY")
    else:
        from llmserve_nb import AppConfig, connect

        api_key = secrets.token_hex(16)
        os.environ["LLMSERVE_NB_API_KEY"] = api_key
        cluster = connect()
        app = cluster.deploy(AppConfig(name="fuzz", route_prefix="/",
                                       runtime_env={"env_vars": {"LLMSERVE_NB_API_KEY": api_key}}), progress=None)
        base_url = app.base_url
    try:
        t0 = time.perf_counter()
        report = fuzz_openapi(base_url, api_key=api_key, max_examples=args.examples, modes=modes, seed=args.seed,
                              max_tokens_cap=args.max_tokens_cap or None)
        report["wall_s"] = round(time.perf_counter() - t0, 1)
    finally:
        if cluster is not None:
            cluster.shutdown()

    print(f"{report['cases']} cases in {report['wall_s']} s")
    print(f"| {'operation':<28} | {'mode':<8} | cases | failed | statuses")
    for r in report["operations"]:
        print(f"| {r['operation']:<28} | {r['mode']:<8} | {r['cases']:>5} | {r['failed']:>6} | {r['statuses']}")
    for f in report["findings"]:
        print(f"\nFINDING {f['operation']} ({f['mode']}): {f['failure']}, HTTP {f['status']}, {f['count']} case(s)\n"
              f"  {f['message'][:400]}\n  reproduce: {f['curl']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
