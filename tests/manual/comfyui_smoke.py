"""Run the pack inside a real ComfyUI over its HTTP API (not collected by pytest: CI has no ComfyUI).

    python tests/manual/comfyui_smoke.py --comfy /path/to/ComfyUI --python /path/to/comfy/venv/bin/python

Needs this pack in ``ComfyUI/custom_nodes`` (a symlink works). It starts ComfyUI with ``--cpu`` on
127.0.0.1, checks the import log and ``/object_info``, queues the demo workflow (API format), waits
for the saved video and reads it back, then queues a long run and cancels it with ``/interrupt``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NODES = ["VDITModelLoader", "VDITTextEncoderLoader", "VDITVAELoader", "VDITTextEncode", "VDITEmptyLatent", "VDITSampler",
         "VDITVAEEncode", "VDITVAEDecode", "VDITLoraApply", "VDITSaveVideo"]


def call(url: str, data: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        return json.loads(body) if body else {}


def wait_done(base: str, prompt_id: str, timeout: float) -> dict:
    t0 = time.time()
    while time.time() - t0 < timeout:
        hist = call(f"{base}/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            return hist[prompt_id]
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("status_str") in ("error", "success"):
            return hist[prompt_id]
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--comfy", required=True)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--port", type=int, default=8188)
    args = p.parse_args()
    comfy = Path(args.comfy)
    base = f"http://127.0.0.1:{args.port}"
    log = open(comfy / "vdit_smoke.log", "w")
    proc = subprocess.Popen([args.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(args.port)],
                            cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
    print(f"ComfyUI pid {proc.pid}")
    try:
        for _ in range(240):
            try:
                call(f"{base}/system_stats")
                break
            except OSError:
                time.sleep(0.5)
        text = (comfy / "vdit_smoke.log").read_text()
        imports = [line.strip() for line in text.splitlines() if "custom_nodes/vdit" in line or "IMPORT FAILED" in line]
        print("import log:", *imports, sep="\n  ")
        info = call(f"{base}/object_info")
        missing = [n for n in NODES if n not in info]
        print(f"our nodes in /object_info: {len(NODES) - len(missing)}/{len(NODES)}", f"missing {missing}" if missing else "")
        templates = call(f"{base}/workflow_templates")
        print("bundled workflows:", templates.get("vdit") or templates)

        api = json.loads((ROOT / "workflows" / "api" / "vdit demo - text to video (no downloads).json").read_text())
        t0 = time.time()
        res = call(f"{base}/prompt", {"prompt": api, "client_id": "vdit-smoke"})
        print("queued demo workflow:", res.get("prompt_id"), "node errors:", res.get("node_errors"))
        hist = wait_done(base, res["prompt_id"], 600)
        print(f"status: {hist['status'].get('status_str')} in {time.time() - t0:.1f} s")
        for kind, msg in hist["status"].get("messages", []):
            if kind == "execution_error":
                print(f"  error in {msg.get('node_type')}: {msg.get('exception_type')}: {msg.get('exception_message')}")
        saved = [img for out in hist["outputs"].values() for img in out.get("images", [])]
        print("outputs:", saved)
        for img in saved:
            path = comfy / "output" / img["subfolder"] / img["filename"]
            sys.path.insert(0, str(ROOT))
            from vdit_core.video_io import read_video

            frames, fps = read_video(path)
            print(f"  {path}: {tuple(frames.shape)} at {fps} fps")

        # a bad size is rejected in validation, before any work
        bad = json.loads(json.dumps(api))
        bad["7"]["inputs"]["frames"] = 18
        try:
            call(f"{base}/prompt", {"prompt": bad})
            print("bad size: NOT rejected")
        except urllib.error.HTTPError as e:
            err = json.loads(e.read())
            print("bad size rejected:", e.code, json.dumps(err.get("node_errors"))[:300])

        # cancel: a long run, interrupted once sampling has started
        long = json.loads(json.dumps(api))
        long["8"]["inputs"]["steps"] = 1000
        long["8"]["inputs"]["seed"] = 7
        res = call(f"{base}/prompt", {"prompt": long})
        time.sleep(8)
        t_cancel = time.time()
        call(f"{base}/interrupt", {})
        hist = wait_done(base, res["prompt_id"], 120)
        msgs = [m[0] for m in hist["status"].get("messages", [])]
        print(f"cancelled run: status {hist['status'].get('status_str')}, messages {msgs}, stopped {time.time() - t_cancel:.2f} s after /interrupt")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
