"""The page and its JSON API (Starlette). Every action is the CLI's: long work starts a job (jobs.py) of
finetune_tts.py, prepare_dataset.py or cli_tts.py, and what the page shows is read from the files those
write (dataset clips and transcripts, dataset_summary.json, qa.json, metrics.jsonl, checkpoint records,
the project manifest). A PipelineError becomes {"error": its line} with status 400, which the page shows.

Folders, as the CLI uses them, relative to the folder the server runs in:
  results/<project>/uploads/     recordings and transcripts uploaded for the project (prepare's input)
  training_data/<project>/       the prepared dataset (speaker <project>)
  results/<project>/webui/       job records and logs, the URLs asked for, speech made in the page
"""

import base64
import ipaddress
import json
import secrets
import shutil
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from fs_pipeline import PipelineError
from fs_pipeline.fileio import write_json_atomic, write_text_atomic
from fs_pipeline.project import RESULTS_ROOT, Project
from fs_pipeline.webui import jobs
from fs_pipeline.webui.uploads import UploadLimits, check_media, check_name, receive, safe_relative, save_upload

DATA_ROOT = Path("training_data")
PAGE = Path(__file__).with_name("page.html")
WORK_KINDS = ("prepare", "extract", "train", "merge")  # jobs that write into the project (speak only reads it)


@dataclass(frozen=True)
class WebSettings:
    base_model: Path
    model_version: str
    device: str | None = None
    auth: tuple[str, str] | None = None  # user, password: required by webui.py off the loopback address
    limits: UploadLimits = UploadLimits()


# The page's forms: (field, CLI flag, kind). Defaults come from the stages' own settings classes.
PREPARE_FIELDS = [("normalize", "--normalize", "bool"), ("split_long", "--split-long", "bool"),
                  ("auto_transcribe", "--auto-transcribe", "bool"), ("whisper_model", "--whisper-model", "str"),
                  ("language", "--language", "str"), ("segment_duration", "--segment-duration", "float"),
                  ("min_clip_duration", "--min-clip-duration", "float"), ("max_clip_duration", "--max-clip-duration", "float"),
                  ("max_duration_minutes", "--max-duration", "float"), ("asr_beam_size", "--asr-beam-size", "int")]
# A flag with a --no- form whose default the CLI decides (the fast path where it is safe): not given, on or off.
SWITCH = ["default", "on", "off"]
TRAIN_FIELDS = [("max_steps", "--max-steps", "int"), ("batch_size", "--batch-size", "int"), ("learning_rate", "--learning-rate", "float"),
                ("gradient_accumulation_steps", "--gradient-accumulation-steps", "int"),
                ("lora_config", "--lora-config", ["r_8_alpha_16", "r_4_alpha_8", "r_16_alpha_32"]),
                ("lora_targets", "--lora-targets", ["all", "slow", "fast"]), ("warmup_steps", "--warmup-steps", "int"),
                ("lr_schedule", "--lr-schedule", ["constant", "cosine"]), ("max_length", "--max-length", "int"),
                ("checkpoint_every", "--checkpoint-every", "int"), ("val_every", "--val-every", "int"),
                ("keep_checkpoints", "--keep-checkpoints", "int"), ("seed", "--seed", "int"),
                ("gradient_checkpointing", "--gradient-checkpointing", "bool"), ("compile", "--compile", SWITCH),
                ("pack_utterances", "--pack-utterances", SWITCH), ("test_clips", "--test-clips", "bool"),
                ("test_clips_whisper_model", "--test-clips-whisper-model", "str"),
                ("test_clips_max_frames", "--test-clips-max-frames", "int")]
SPEAK_FIELDS = [("temperature", "--temperature", "float"), ("top_p", "--top-p", "float"),
                ("repetition_penalty", "--repetition-penalty", "float"), ("seed", "--seed", "int"),
                ("max_new_frames", "--max-new-frames", "int")]


def _form(spec, settings_class) -> list[dict]:
    defaults = {f.name: f.default for f in fields(settings_class)}
    return [{"name": name, "flag": flag, "kind": kind, "default": "default" if kind is SWITCH else defaults[name]} for name, flag, kind in spec]


def _args(spec, values: dict) -> list[str]:
    """CLI flags for the submitted form values; the CLI checks them and says what is wrong."""
    args = []
    for name, flag, kind in spec:
        value = values.get(name)
        if kind == "bool":
            args += [flag] if value else []
        elif kind is SWITCH:
            args += {"on": [flag], "off": [f"--no-{flag.removeprefix('--')}"]}.get(value, [])
        elif value not in (None, ""):
            args += [flag, str(value)]
    return args


class _Project:
    """A project's folders, as the CLI names them."""

    def __init__(self, name: str):
        self.project = Project(name)
        self.name = name
        self.data = DATA_ROOT / name
        self.uploads = self.project.dir / "uploads"
        self.webui = self.project.dir / "webui"


def create_app(settings: WebSettings) -> Starlette:
    estimates = {}

    def existing(request: Request) -> _Project:
        p = _Project(request.path_params["name"])
        if not p.project.dir.is_dir():
            raise PipelineError(f"no project '{p.name}' in {RESULTS_ROOT}/: create it first")
        return p

    def running_work(p: _Project) -> dict | None:
        return next((j for j in reversed(jobs.all_jobs(p.project)) if j["state"] == "running" and j["kind"] in WORK_KINDS), None)

    async def page(request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def projects(request):
        if request.method == "POST":
            body = await request.json()
            p = _Project(str(body.get("name", "")).strip())
            p.project.dir.mkdir(parents=True, exist_ok=True)
        found = sorted(d.name for d in RESULTS_ROOT.glob("*") if d.is_dir() and not d.name.startswith(".")) if RESULTS_ROOT.is_dir() else []
        return JSONResponse({"projects": found})

    async def forms(request):
        from fs_pipeline.stages.prepare import PrepareSettings
        from fs_pipeline.stages.synthesize import SynthesisSettings
        from fs_pipeline.stages.train import TrainSettings

        return JSONResponse({"prepare": _form(PREPARE_FIELDS, PrepareSettings), "train": _form(TRAIN_FIELDS, TrainSettings),
                             "speak": _form(SPEAK_FIELDS, SynthesisSettings)})

    async def receive_upload(request, p: _Project, name: str, install) -> list[Path]:
        """The request's body into a scratch folder of the project, under the upload's own name (so that
        errors name it), then `install(received)`; the scratch copy is removed whatever happens."""
        scratch = p.webui / "incoming" / secrets.token_hex(8)
        scratch.mkdir(parents=True)
        try:
            received = scratch / safe_relative(name).name
            await receive(request.stream(), received, settings.limits.max_bytes, name)
            return install(received)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def upload(request):
        p = existing(request)
        name = request.query_params.get("name", "")
        check_name(name)
        written = await receive_upload(request, p, name, lambda received: save_upload(received, name, p.uploads, settings.limits))
        return JSONResponse({"written": [path.relative_to(p.uploads).as_posix() for path in written]})

    async def reference(request):
        """A reference clip for Speak, kept in results/<project>/webui/reference/."""
        p = existing(request)
        name = safe_relative(request.query_params.get("name", "")).name
        folder = p.webui / "reference"

        def install(received: Path) -> list[Path]:
            check_media(received, name)
            folder.mkdir(parents=True, exist_ok=True)
            return [Path(shutil.copyfile(received, folder / name))]

        await receive_upload(request, p, name, install)
        return JSONResponse({"reference": name})

    async def urls(request):
        p = existing(request)
        path = p.webui / "urls.json"
        known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        if request.method == "POST":
            from fs_pipeline.stages.prepare import is_url

            url = str((await request.json()).get("url", "")).strip()
            if not is_url(url):
                raise PipelineError(f"'{url}' is not a URL: paste an http(s) address of a video, playlist or audio file")
            known = sorted(set(known) | {url})
            write_json_atomic(path, known)
        return JSONResponse({"urls": known})

    async def prepare(request):
        p = existing(request)
        values = await request.json()
        path = p.webui / "urls.json"
        inputs = ["--input", str(p.uploads)] if p.uploads.is_dir() else []
        for url in json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []:
            inputs += ["--input", url]
        if not inputs:
            raise PipelineError(f"project {p.name} has no recordings yet: upload files or add a URL first")
        args = [*inputs, "--output", str(p.data), "--speaker", p.name, "--model-version", settings.model_version,
                *_args(PREPARE_FIELDS, values), *_device()]
        return JSONResponse(jobs.start(p.project, "prepare", "prepare_dataset.py", args))

    def _device() -> list[str]:
        return ["--device", settings.device] if settings.device else []

    def _project_args(p: _Project) -> list[str]:
        return ["--project", p.name, "--pretrained-ckpt-path", str(settings.base_model), "--model-version", settings.model_version,
                *_device()]

    async def check_data(request):
        p = existing(request)
        return JSONResponse(jobs.start(p.project, "extract", "finetune_tts.py", [*_project_args(p), "--data-dir", str(p.data), "--extract-tokens"]))

    async def train(request):
        p = existing(request)
        values = await request.json()
        args = [*_project_args(p), "--data-dir", str(p.data), "--train", *_args(TRAIN_FIELDS, values)]
        if values.get("start_over"):
            args += ["--force-stage", "train"]
        return JSONResponse(jobs.start(p.project, "train", "finetune_tts.py", args, max_steps=values.get("max_steps")))

    async def merge(request):
        p = existing(request)
        step = int((await request.json())["step"])
        return JSONResponse(jobs.start(p.project, "merge", "finetune_tts.py", [*_project_args(p), "--merge-weights", "--checkpoint-step", str(step)]))

    async def speak(request):
        from fs_pipeline.stages.merge import merged_path

        p = existing(request)
        values = await request.json()
        model = merged_path(p.project)
        if not (model / "model.pth").is_file():
            raise PipelineError(f"no merged model in {model} yet: merge a checkpoint first (Checkpoints)")
        output = p.webui / "speech" / f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S-%f')}.wav"
        args = ["--model-path", str(model), "--model-version", settings.model_version, "-o", str(output), *_args(SPEAK_FIELDS, values),
                *_device()]
        if values.get("reference"):
            args += ["--reference-audio", str(p.webui / "reference" / safe_relative(values["reference"]).name),
                     "--reference-text", str(values.get("reference_text", ""))]
        args += ["--", str(values.get("text", ""))]  # after "--", a text that starts with "-" is still the text
        return JSONResponse(jobs.start(p.project, "speak", "cli_tts.py", args, output=output.relative_to(p.project.dir).as_posix()))

    async def stop(request):
        p = existing(request)
        return JSONResponse(jobs.stop(p.project, request.path_params["job"]))

    async def clips(request):
        """The dataset's clips with their transcripts, and the QA flags of the last pack beside them."""
        import soundfile

        p = existing(request)
        flags = {}
        qa = p.project.data_dir / "qa.json"
        if qa.is_file():
            flags = {clip["key"]: clip["flags"] for clip in json.loads(qa.read_text(encoding="utf-8"))["clips"]}
        rows = []
        if p.data.is_dir():
            for wav in sorted(p.data.rglob("*.wav")):
                key = wav.relative_to(p.data).as_posix()
                if any(part.startswith(".") for part in wav.relative_to(p.data).parts):
                    continue  # downloads and temp files
                lab = wav.with_suffix(".lab")
                rows.append({"key": key, "text": lab.read_text(encoding="utf-8").strip() if lab.is_file() else None,
                             "seconds": round(soundfile.info(str(wav)).duration, 2), "flags": flags.get(key, [])})
        summary = p.data / "dataset_summary.json"
        skipped = json.loads(summary.read_text(encoding="utf-8")).get("skipped", []) if summary.is_file() else []
        uploads = sorted(f.relative_to(p.uploads).as_posix() for f in p.uploads.rglob("*") if f.is_file()) if p.uploads.is_dir() else []
        return JSONResponse({"clips": rows, "skipped": skipped, "uploads": uploads, "qa": qa.is_file()})

    def clip_path(p: _Project, key: str) -> Path:
        wav = p.data / safe_relative(key, "clip")
        if wav.suffix != ".wav" or not wav.is_file():
            raise PipelineError(f"no clip {key} in {p.data}: reload the page")
        return wav

    async def transcript(request):
        p = existing(request)
        key = request.path_params["key"]
        wav = clip_path(p, key)
        if (job := running_work(p)) is not None:
            raise PipelineError(f"a {job['kind']} job (pid {job['pid']}) is using {p.data}: wait for it or stop it, then edit")
        text = str((await request.json()).get("text", "")).strip()
        if not text:
            # what extract would refuse later (dataset.list_clips), refused now so no empty .lab is ever written
            raise PipelineError(f"{wav.with_suffix('.lab').relative_to(p.data)} would be empty: type the words spoken in the clip, "
                                "or delete the clip")
        write_text_atomic(wav.with_suffix(".lab"), text + "\n")
        return JSONResponse({"key": key, "text": text})

    async def delete_clip(request):
        from fs_pipeline.stages.prepare import CLIP_FILES

        p = existing(request)
        wav = clip_path(p, request.path_params["key"])
        if (job := running_work(p)) is not None:
            raise PipelineError(f"a {job['kind']} job (pid {job['pid']}) is using {p.data}: wait for it or stop it, then delete")
        for suffix in CLIP_FILES:
            wav.with_suffix(suffix).unlink(missing_ok=True)
        return JSONResponse({"deleted": request.path_params["key"]})

    async def state(request):
        """What changes while jobs run: the jobs, the stages' status, the training metrics, the checkpoints."""
        from fs_pipeline import checkpoints, pipeline
        from fs_pipeline.manifest import Manifest
        from fs_pipeline.report import read_metrics
        from fs_pipeline.stages.merge import merged_path

        p = existing(request)
        metrics = [{k: row.get(k) for k in ("step", "loss", "val_loss", "tokens_per_second")} for row in read_metrics(p.project)]
        folder = p.project.dir / "checkpoints"
        rows = []
        for info in checkpoints.list_checkpoints(folder):
            clip_dir = folder / f"{info.path.stem}_clips"
            rows.append({"name": info.path.name, "step": info.step, "created_at": info.created_at, "size_mb": round(info.size_mb, 1),
                         "val_loss": info.val_loss, "wer": info.wer, "similarity": info.similarity,
                         "clips": [c.relative_to(p.project.dir).as_posix() for c in sorted(clip_dir.glob("*.wav"))]})
        base_dir = folder / "base_clips"
        base = {"scores": checkpoints.base_scores(folder),
                "clips": [c.relative_to(p.project.dir).as_posix() for c in sorted(base_dir.glob("*.wav"))]}
        best = checkpoints.best(folder)
        merged = merged_path(p.project) / "manifest.json"
        merged_info = json.loads(merged.read_text(encoding="utf-8")) if merged.is_file() else None
        return JSONResponse({
            "jobs": jobs.all_jobs(p.project)[-20:], "status": pipeline.status(p.project), "metrics": metrics,
            "checkpoints": rows, "base": base, "best": best.path.name if best else None,
            # the training settings the project was last run with, which the CLI would recall too
            "train_settings": Manifest(p.project.manifest_path).data.get("project", {}).get("train", {}),
            "merged": {"path": str(merged.parent), "checkpoint": Path(merged_info["checkpoint"]["path"]).name} if merged_info else None,
        })

    async def estimate(request):
        """The memory estimate train prints, for the chosen batch and adapters, from the base model built once
        without its weights (train.model_for_estimate: nothing loaded, the GPU stays free for the jobs)."""
        from fs_pipeline.device import select_device
        from fs_pipeline.lora import LoraSettings
        from fs_pipeline.models import open_model_dir
        from fs_pipeline.stages import train

        q = request.query_params
        lora_config, targets = q.get("lora_config", "r_8_alpha_16"), q.get("lora_targets", "all")
        choice = select_device(settings.device)
        key = (lora_config, targets, choice.dtype)
        model_dir = open_model_dir(settings.base_model, settings.model_version)
        lora = replace(LoraSettings.from_name(lora_config), targets=targets)
        if key not in estimates:
            estimates.clear()  # the last one kept: each takes seconds to build (imports, tokenizer)
            estimates[key] = train.model_for_estimate(model_dir, lora, choice.dtype)
        length = int(q.get("max_length") or model_dir.config["max_seq_len"])
        batch = int(q.get("batch_size") or 1)
        gb = train.estimate_memory(estimates[key], batch, length, lora, choice)
        return JSONResponse({"gb": round(gb, 3), "device": str(choice.device), "tokens": length, "batch_size": batch})

    async def files(request):
        """A file of the project (results/<project>/...) or of its dataset (training_data/<project>/...)."""
        p = existing(request)
        root = {"results": p.project.dir, "data": p.data}.get(request.path_params["area"])
        relative = request.path_params["path"]
        try:
            path = root / safe_relative(relative, "file") if root else None
        except PipelineError:  # a name reaching outside the folder, or into hidden parts: nothing to serve
            path = None
        if path is None or not path.is_file():
            return JSONResponse({"error": f"no file {relative}"}, status_code=404)
        return FileResponse(path)

    routes = [
        Route("/", page), Route("/api/projects", projects, methods=["GET", "POST"]), Route("/api/forms", forms),
        Route("/api/p/{name}/upload", upload, methods=["PUT"]), Route("/api/p/{name}/reference", reference, methods=["PUT"]),
        Route("/api/p/{name}/urls", urls, methods=["GET", "POST"]), Route("/api/p/{name}/prepare", prepare, methods=["POST"]),
        Route("/api/p/{name}/extract", check_data, methods=["POST"]), Route("/api/p/{name}/train", train, methods=["POST"]),
        Route("/api/p/{name}/merge", merge, methods=["POST"]), Route("/api/p/{name}/speak", speak, methods=["POST"]),
        Route("/api/p/{name}/jobs/{job}/stop", stop, methods=["POST"]), Route("/api/p/{name}/clips", clips),
        Route("/api/p/{name}/clips/{key:path}/transcript", transcript, methods=["PUT"]),
        Route("/api/p/{name}/clips/{key:path}", delete_clip, methods=["DELETE"]), Route("/api/p/{name}/state", state),
        Route("/api/p/{name}/estimate", estimate), Route("/files/{name}/{area}/{path:path}", files),
    ]
    middleware = [Middleware(_SameSite)] + ([Middleware(_Auth, credentials=settings.auth)] if settings.auth else [])
    return Starlette(routes=routes, middleware=middleware, exception_handlers={PipelineError: _user_error})


async def _user_error(request, exc: PipelineError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


class _SameSite:
    """Refuses what another web site could make the user's browser send here. A POST must say it is JSON,
    which a cross-site page can only send after a CORS preflight that this server never grants (PUT and
    DELETE always need one). A Host header that is not an address of this machine is a DNS-rebinding
    attempt when the page is served on the loopback address."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            problem = None
            if scope["method"] == "POST" and not headers.get(b"content-type", b"").startswith(b"application/json"):
                problem = "POST requests must be application/json"
            host = headers.get(b"host", b"").decode(errors="replace").rsplit(":", 1)[0].strip("[]")
            server_host = (scope.get("server") or ("",))[0]
            if is_loopback(server_host) and not is_loopback(host):
                problem = f"host {host or '(none)'} is not this machine"
            if problem:
                await JSONResponse({"error": problem}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Auth:
    """HTTP basic authentication on every request (webui.py requires it off the loopback address)."""

    def __init__(self, app, credentials: tuple[str, str]):
        self.app = app
        self.expected = "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"").decode(errors="replace")
            if not secrets.compare_digest(given, self.expected):
                response = Response("authentication required", status_code=401, headers={"WWW-Authenticate": 'Basic realm="fs-pipeline"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
