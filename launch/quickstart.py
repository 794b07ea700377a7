"""The quickstart: a real merge on real ranks from a real (local) S3 server.

Builds the tiny model family (cached), starts a moto S3 server on 127.0.0.1, uploads the
sources, runs `mpirun -n 2 bigmerge merge configs/quickstart.yaml s3://...`, verifies the
output, loads it with transformers, generates a few tokens, and prints a summary.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".quickstart"
BUCKET = "bigmerge-quickstart"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def main() -> int:
    sys.path.insert(0, str(REPO / "tools"))
    from toy_models import make_family

    t0 = time.perf_counter()
    bindir = Path(sys.executable).parent
    step("building the tiny model family (a base and two fine-tunes; cached)")
    family = make_family(WORK / "zoo", preset="tiny", dtype="bfloat16", n_finetunes=2)
    for name, path in family.items():
        print(f"  {name}: {path}")

    step("starting a local S3 server (moto) on 127.0.0.1")
    port = free_port()
    env = dict(os.environ)
    env.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="quickstart",
        AWS_SECRET_ACCESS_KEY="quickstart-secret",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
        TOKENIZERS_PARALLELISM="false",
    )
    server = subprocess.Popen(
        [str(bindir / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="quickstart", secret="quickstart-secret")
        for _ in range(100):
            try:
                fs.ls("")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.1)
        fs.mkdir(BUCKET)
        for name in ("base", "ft1", "ft2"):
            fs.put(str(family[name]), f"{BUCKET}/zoo/{name}", recursive=True)
        print(f"  uploaded to s3://{BUCKET}/zoo/{{base,ft1,ft2}}")

        step("bigmerge plan configs/quickstart.yaml -n 2")
        subprocess.run(
            [str(bindir / "bigmerge"), "plan", "configs/quickstart.yaml", "-n", "2"], cwd=REPO, env=env, check=True
        )

        out_url = f"s3://{BUCKET}/merged"
        step(f"mpirun -n 2 bigmerge merge configs/quickstart.yaml {out_url}")
        t_merge = time.perf_counter()
        subprocess.run(
            [
                str(bindir / "mpirun"),
                "-n",
                "2",
                "--oversubscribe",
                str(bindir / "bigmerge"),
                "merge",
                "configs/quickstart.yaml",
                out_url,
                "--overwrite",
            ],
            cwd=REPO,
            env=env,
            check=True,
        )
        merge_s = time.perf_counter() - t_merge
        step(f"bigmerge verify {out_url}")
        subprocess.run([str(bindir / "bigmerge"), "verify", out_url], cwd=REPO, env=env, check=True)

        local = WORK / "merged"
        shutil.rmtree(local, ignore_errors=True)
        fs.get(f"{BUCKET}/merged", str(local), recursive=True)
    finally:
        server.terminate()
        server.wait(timeout=10)

    step("loading the merged model with transformers and generating")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(local))
    model = AutoModelForCausalLM.from_pretrained(str(local), dtype=torch.bfloat16)
    ids = tok("12+34=", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    new_ids = gen[0, ids["input_ids"].shape[1] :].tolist()
    manifest = json.loads((local / "bigmerge-manifest.json").read_text())

    step("summary")
    print(f"  method          {manifest['merge_method']}")
    print(f"  tensors         {len(manifest['tensors'])}, checksums verified")
    print(f"  output          {out_url} (copied to {local})")
    print(f"  merge wall time {merge_s:.1f} s on 2 ranks")
    print(f"  generated       token ids {new_ids} (the toy models are untrained: the point is that it loads and runs)")
    print(f"  total           {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
