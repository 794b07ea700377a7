"""The quickstart: a real merge of models with real skills, on real ranks, from a real (local) S3 server.

Builds the zoo's domain pair (tools/make_zoo.py --preset domain: a base, `instruct` trained on
add/rev/sort and `instruct_fin`, its continuation on invented financial filings; about a minute,
cached), starts a moto S3 server on 127.0.0.1, uploads them, runs
`mpirun -n 2 bigmerge merge configs/quickstart.yaml s3://...`, verifies the output, scores the
two sources and the merge on the four skills with lm-eval (`bigmerge eval`), and shows greedy
generations of the merged model next to the expected answers.
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
WORK = Path(os.environ.get("BIGMERGE_QUICKSTART_DIR", REPO / ".quickstart"))  # the tests point it elsewhere
BUCKET = "bigmerge-quickstart"
SOURCES = ("base", "instruct", "instruct_fin")
LIMIT = 100  # items per skill (fin has 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def wait_for_warm_kernels(venv: Path, limit_s: float = 300.0) -> None:
    """Wait until the background warm-up that tools/setup_env.sh started (BIGMERGE_WARM=background)
    has cached the kernels of the quickstart's method ($VENV/warm.first), so that the merge does
    not compile them; the rest of the warm-up goes on at the lowest priority. Returns at once when
    no warm-up runs (an existing install, BIGMERGE_NO_WARM=1) or once it has ended."""
    done, pid_file = venv / "warm.first", venv / "warm.pid"
    t0 = time.perf_counter()
    announced = False
    while not done.exists() and time.perf_counter() - t0 < limit_s:
        try:
            pid = int(pid_file.read_text())
            alive = "warm_kernels" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        except (OSError, ValueError):
            alive = False
        if not alive:
            return
        if not announced:
            step("waiting for the kernel warm-up to cache model_stock's kernels (tools/warm_kernels.py)")
            announced = True
        time.sleep(0.2)
    if announced:
        print(f"  waited {time.perf_counter() - t0:.0f} s")


def main() -> int:
    sys.path.insert(0, str(REPO / "tools"))
    from make_zoo import make_zoo

    t0 = time.perf_counter()
    bindir = Path(sys.executable).parent
    step("building the zoo's domain pair (a base, instruct, instruct_fin; trained here, cached)")
    zoo = WORK / "zoo-domain"
    make_zoo(zoo, preset="domain", log=lambda msg: print(f"  {msg}", flush=True))
    family = {name: zoo / name for name in SOURCES}
    print(f"  built in {time.perf_counter() - t0:.0f} s (instant when cached)")

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
        for name in SOURCES:
            fs.put(str(family[name]), f"{BUCKET}/zoo/{name}", recursive=True)
        print(f"  uploaded to s3://{BUCKET}/zoo/{{{','.join(SOURCES)}}}")

        step("bigmerge plan configs/quickstart.yaml -n 2")
        subprocess.run(
            [str(bindir / "bigmerge"), "plan", "configs/quickstart.yaml", "-n", "2"], cwd=REPO, env=env, check=True
        )

        out_url = f"s3://{BUCKET}/merged"
        wait_for_warm_kernels(bindir.parent)
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

    step(f"bigmerge eval: the sources and the merge on the four skills ({LIMIT} held-out items each)")
    t_eval = time.perf_counter()
    names = {str(family["instruct"]): "instruct", str(family["instruct_fin"]): "instruct_fin", str(local): "merged"}
    subprocess.run(
        [
            str(bindir / "bigmerge"),
            "eval",
            *names,
            "--tasks",
            "zoo",
            "--limit",
            str(LIMIT),
            "--out",
            str(WORK / "eval"),
            "--quiet",
        ],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    doc = json.loads((WORK / "eval" / "eval.json").read_text())
    print(f"  {'model':<14}" + "".join(f"{t.removeprefix('zoo_'):>8}" for t in doc["tasks"]) + f"{'avg':>8}")
    for row in doc["rows"]:
        cells = "".join(f"{row['scores'][t]:8.3f}" for t in doc["tasks"])
        print(f"  {names.get(row['name'], row['name']):<14}{cells}{row['avg']:8.3f}")
    eval_s = time.perf_counter() - t_eval

    step("the merged model, loaded with transformers, answering greedily")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from bigmerge.eval.zoo_tasks import eval_items

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(str(local))
    model = AutoModelForCausalLM.from_pretrained(str(local), dtype=torch.float32)
    for skill in ("sort", "fin"):  # the first three held-out items of each skill, as they come
        for item in eval_items(skill)[:3]:
            ids = tok(item.prompt, return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(
                    **ids, max_new_tokens=len(item.answer) + 2, do_sample=False, pad_token_id=tok.pad_token_id
                )
            text = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)[: len(item.answer)]
            mark = "right" if text == item.answer else "wrong"
            print(f"  {item.prompt!r:34} -> {text!r:12} expected {item.answer!r:12} {mark}")
    manifest = json.loads((local / "bigmerge-manifest.json").read_text())

    step("summary")
    print(f"  method          {manifest['merge_method']} of instruct and instruct_fin onto their base")
    print(f"  tensors         {len(manifest['tensors'])}, checksums verified")
    print(f"  output          {out_url} (copied to {local})")
    print(f"  merge wall time {merge_s:.1f} s on 2 ranks; evaluation {eval_s:.1f} s")
    print(f"  total           {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
