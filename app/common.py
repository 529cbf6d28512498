"""What every tab shares: the app's private temp folder (a folder per visitor, with disk quotas and
expiry by age), upload checks, readable errors."""

from __future__ import annotations

import atexit
import contextvars
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path

from comcat.compression.hub import HUB_ID, HUB_ID_RULE
from comcat.compression.models import CHECKPOINT_SUFFIXES
from comcat.core.errors import ComcatError
from comcat.core.records import MAX_TEXT_BYTES

WORK_PREFIX = "comcat-app-"
PID_FILE = ".pid"  # the server process that owns a WORK folder


def remove_stale_work(temp: str | Path | None = None) -> list[Path]:
    """Remove the temp folders of earlier app processes that are gone (a killed server leaves its
    folder behind); returns what was removed."""
    removed = []
    for folder in Path(temp or tempfile.gettempdir()).glob(WORK_PREFIX + "*"):
        try:
            pid = int((folder / PID_FILE).read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None:  # an older app's folder: removed once it is a day old
            stale = folder.is_dir() and time.time() - folder.stat().st_mtime > 86400
        else:
            stale = pid != os.getpid() and not _alive(pid)
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


remove_stale_work()
WORK = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))  # uploads and outputs live here only, removed at exit
(WORK / PID_FILE).write_text(str(os.getpid()))
atexit.register(shutil.rmtree, WORK, True)
MAX_UPLOAD_MB = 1024
VISITOR_QUOTA_MB = 2048  # what one visitor's folder may hold (unpacked zips counted before unpacking)
DISK_QUOTA_MB = 8192  # what all visitors' folders may hold together
SESSION_TTL_S = 3600  # a visitor's folder idle this long is removed (no run of theirs going)
DATA_SOURCES = ("embedded shapes", "folder path", "uploaded zip")
NO_DATA = "none (weights only)"  # a compress run from the weights alone (SVD ranks), any model but the embedded one
OWNER: contextvars.ContextVar = contextvars.ContextVar("owner", default=None)  # the visitor a handler serves


def visitor(request) -> str | None:
    """The visitor's session id (gradio's session hash) for `request`, and the owner of the folders
    this handler makes (workdir). Marks the visitor active, and expires idle visitors' folders."""
    owner = getattr(request, "session_hash", None)
    OWNER.set(owner)
    folder = _folder(owner)
    if folder.is_dir():
        os.utime(folder)  # the folder's mtime: the visitor's last request
    expire_idle()
    return owner


def _folder(owner: str | None) -> Path:
    return WORK / ((re.sub(r"[^A-Za-z0-9_-]", "", owner)[:64] or "shared") if owner else "shared")


BUSY: set = set()  # folders of visitors with a run going: they never expire (runner.py adds and removes them)


class Recent:
    """The `keep` most recently used values by key, shared by all visitors; a miss calls load()."""

    def __init__(self, keep: int = 2):
        self.cache: OrderedDict = OrderedDict()
        self.keep = keep
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.cache)

    def put(self, key, value) -> None:
        with self.lock:
            self.cache[key] = value
            self.cache.move_to_end(key)
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)

    def get(self, key, load):
        with self.lock:
            value = self.cache.get(key)
            if value is not None:
                self.cache.move_to_end(key)
        if value is None:
            value = load()
            self.put(key, value)
        return value


def busy_name(owner: str | None) -> str:
    return _folder(owner).name


_EXPIRY = threading.Lock()


def expire_idle(now: float | None = None) -> list[str]:
    """Remove the folders of visitors idle for SESSION_TTL_S (their last request), unless a run of
    theirs is going; returns the folder names removed. Needs no heartbeat: API clients never send one."""
    if not _EXPIRY.acquire(blocking=False):
        return []
    try:
        now = time.time() if now is None else now
        gone = []
        for folder in WORK.iterdir() if WORK.is_dir() else ():
            if not folder.is_dir() or folder.name == "gradio" or folder.name in BUSY:
                continue
            if now - folder.stat().st_mtime > SESSION_TTL_S:
                shutil.rmtree(folder, ignore_errors=True)
                gone.append(folder.name)
        return gone
    finally:
        _EXPIRY.release()


def used_mb(folder: Path) -> float:
    """Bytes of the files under `folder`, in MB."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total / 2**20


def check_quota(adding_mb: float, what: str) -> None:
    """Refuse `adding_mb` more in the visitor's folder when it would pass the visitor's or the
    server's disk quota; one line that says which."""
    mine = used_mb(_folder(OWNER.get())) if _folder(OWNER.get()).is_dir() else 0.0
    if mine + adding_mb > VISITOR_QUOTA_MB:
        raise ComcatError(
            f"{what} needs {adding_mb:,.0f} MB, and your files here already take {mine:,.0f} MB of the "
            f"{VISITOR_QUOTA_MB:,} MB each visitor may use: upload less, or reload the page later"
        )
    everyone = used_mb(WORK)
    if everyone + adding_mb > DISK_QUOTA_MB:
        raise ComcatError(
            f"{what} needs {adding_mb:,.0f} MB, and this server's disk space for visitors is full: try again later"
        )


def workdir(kind: str) -> Path:
    """A fresh folder under the app's temp folder for the current visitor, e.g. workdir('explore')."""
    d = _folder(OWNER.get()) / kind / uuid.uuid4().hex[:10]
    d.mkdir(parents=True)
    return d


DATA_ROOT: Path | None = None  # server folders a visitor may name (python app.py --data-root DIR); None: none


def server_folder(path: str, what: str, instead: str = "upload your files") -> Path:
    """`path` (relative to DATA_ROOT, or absolute inside it) resolved inside DATA_ROOT; messages show
    only what the visitor typed. `instead`: what to do where no server folders are allowed."""
    typed = path.strip()
    if DATA_ROOT is None:
        raise ComcatError(
            f"this app reads no server folders: {instead} (the operator can allow a folder with "
            "python app.py --data-root DIR)"
        )
    root = DATA_ROOT.resolve()
    target = (root / typed).resolve()
    if not typed or not target.is_relative_to(root) or not target.is_dir():
        raise ComcatError(f"{what} {typed!r} does not exist under the app's data root: type a folder inside it")
    return target


def pipeline_spec(text: str) -> str:
    """What a visitor typed as a text-to-image pipeline, as load_pipeline takes it: 'embedded', a
    hub ID (never read as a server path), or a folder under the data root."""
    text = (text or "").strip() or "embedded"
    if text == "embedded":
        return text
    if DATA_ROOT is not None:
        try:
            return str(server_folder(text, "pipeline folder"))
        except ComcatError:
            pass
    if HUB_ID.fullmatch(text):
        return "hub:" + text
    raise ComcatError(
        f"pipeline {text!r}: type 'embedded' or a hub ID like runwayml/stable-diffusion-v1-5"
        + (", or a diffusers folder under the app's data root" if DATA_ROOT else "")
    )


def take_upload(path: str | None, suffixes: tuple[str, ...], what: str, max_mb: float = MAX_UPLOAD_MB) -> Path:
    """An uploaded file, after checking its type and size, linked into the visitor's folder (a hard
    link: no second copy on disk, and it outlives gradio's upload cache)."""
    if not path:
        raise ComcatError(f"upload a {what} first")
    src = Path(path)
    if src.suffix.lower() not in suffixes:
        raise ComcatError(f"{src.name} is not a {what}: expected one of {', '.join(suffixes)}")
    size = src.stat().st_size / 2**20
    if size > max_mb:
        raise ComcatError(f"{src.name} is {size:.0f} MB, over the {max_mb:.0f} MB limit of the app")
    dst = workdir("uploads") / src.name
    try:
        os.link(src, dst)
    except OSError:  # another filesystem: a copy, counted against the quota
        check_quota(size, src.name)
        shutil.copyfile(src, dst)
    return dst


MAX_ZIP_FILES = 200_000
MAX_UNZIPPED_MB = 1024  # what a zip may unpack to (its entries' declared sizes; zipfile holds them to it)


def unzip(path: str | None, what: str = "zip of an image folder", kind: str = "data") -> Path:
    """Extract an uploaded zip under the app's temp folder, refusing paths that leave it and bombs;
    returns its one top folder, or the folder of its contents."""
    src = take_upload(path, (".zip",), what)
    out = workdir(kind) / (re.sub(r"[^\w.-]", "_", Path(src.name).stem)[:64] or "upload")  # named as the visitor's zip
    try:
        with zipfile.ZipFile(src) as z:
            names = z.namelist()
            if len(names) > MAX_ZIP_FILES:
                raise ComcatError(f"{src.name} holds {len(names):,} files, over the app's limit of {MAX_ZIP_FILES:,}")
            unpacked = sum(i.file_size for i in z.infolist()) / 2**20
            if unpacked > MAX_UNZIPPED_MB:
                raise ComcatError(
                    f"{src.name} unpacks to {unpacked:,.0f} MB, over the app's limit of "
                    f"{MAX_UNZIPPED_MB:,} MB: zip fewer or smaller files"
                )
            check_quota(unpacked, f"unpacking {src.name}")
            for n in names:
                if n.startswith(("/", "\\")) or ".." in Path(n).parts:
                    raise ComcatError(f"{src.name} has an unsafe path {n!r}: zip the image folder itself")
            z.extractall(out)
    except zipfile.BadZipFile:
        raise ComcatError(f"{src.name} is not a readable zip file") from None
    entries = [p for p in out.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else out  # folder/… or its contents


def chosen_data(source: str, path: str = "", upload: str | None = None, model: str = "embedded") -> str | None:
    """The data of a run: None for the embedded shapes or none at all (weights only: SVD ranks, for a
    model other than the embedded one), else a folder (typed, or an unzipped upload) or an uploaded
    text file of sentences."""
    if source == NO_DATA:
        if model == "embedded":
            raise ComcatError("the embedded model always compresses on its shapes: choose 'embedded shapes' under data")
        return None
    if source == "folder path":
        return str(server_folder(path, "data folder", "upload a zip of your images"))
    if source == "uploaded zip":
        if upload and Path(upload).suffix.lower() == ".txt":  # sentences for a text encoder, not zipped
            return str(
                take_upload(upload, (".txt",), "text file of sentences", min(MAX_UPLOAD_MB, MAX_TEXT_BYTES / 2**20))
            )
        return str(unzip(upload))
    if model != "embedded":
        raise ComcatError(
            "the embedded shapes only fit the embedded model: choose 'folder path' or 'uploaded zip' "
            "under data and give images of your own (labels are not needed)"
        )
    return None


CLI_TO_PAGE = [  # the library's advice names command-line flags; the page names its own controls
    (r"also pass its architecture, e\.g\. --arch (\S+)", r"type its architecture in the 'architecture' box, e.g. \1"),
    (r"pass the right --arch", "type the right architecture in the 'architecture' box"),
    (r"continue it with --resume \S+", "press Resume"),
    (r"`--resume` continues the run", "Resume continues the run"),
    (r"--lr\b", "the learning rate"),
]


def public_text(text: str) -> str:
    """`text` for the page: the app's own server paths cut to what a visitor knows (a file in the
    app's temp folder by its name, one under the data root relative to it), and command-line advice
    in the page's terms."""
    for pattern, page in CLI_TO_PAGE:
        text = re.sub(pattern, page, text)
    text = re.sub(re.escape(str(WORK)) + r"/[^\s'\"]*/([^/\s'\"]+)", r"\1", text)
    if DATA_ROOT is not None:
        text = text.replace(str(DATA_ROOT.resolve()) + "/", "").replace(str(DATA_ROOT) + "/", "")
    return text


def message(e: BaseException) -> str:
    """One readable line for the page: the library's own message, else the exception's first line;
    server paths as `public_text` gives them."""
    if isinstance(e, ComcatError):
        return f"**Error:** {public_text(str(e))}"
    first = public_text((str(e).strip().splitlines() or [""])[0][:200])
    return f"**Error:** {type(e).__name__}: {first}" if first else f"**Error:** {type(e).__name__}"


def follow_typing(typed, uploaded, choice, typed_value: str, uploaded_value: str) -> None:
    """Typing in a box or uploading a file selects that source in the `choice` radio (a typed path
    is never silently ignored)."""
    import gradio as gr

    typed.input(lambda text: typed_value if text.strip() else gr.skip(), typed, choice, queue=False)
    uploaded.upload(lambda _: uploaded_value, uploaded, choice, queue=False)


def model_inputs(elem_prefix: str | None = None) -> tuple:
    """The boxes that name a model, as Explore and Compress show them: (name, upload, arch). The
    name box takes timm names and hub ids; the upload a checkpoint or a zipped model folder."""
    import gradio as gr

    def eid(what: str) -> str | None:
        return f"{elem_prefix}-{what}" if elem_prefix else None

    name = gr.Textbox(
        label="timm name, or a hub id: org/name (transformers) or hf-hub:org/name (timm); weights need network",
        placeholder="deit_small_patch16_224",
        elem_id=eid("name"),
    )
    upload = gr.File(
        label="checkpoint (.safetensors, .pth) or zipped dense model folder",
        file_types=[*CHECKPOINT_SUFFIXES, ".zip"],
        type="filepath",
        elem_id=eid("upload"),
    )
    arch = gr.Textbox(
        label="architecture of the checkpoint (timm name; guessed from an uploaded checkpoint's shapes when it can be)",
        placeholder="vit_tiny_patch16_224",
        elem_id=eid("arch"),
    )
    upload.upload(guess_arch_box, [upload, arch], arch, queue=False)
    return name, upload, arch


def guess_arch_box(upload: str | None, typed: str = ""):
    """The architecture box after an upload: what the checkpoint's shapes fit, unless the visitor
    typed one (an unknown shape leaves the box as it is)."""
    import gradio as gr

    from comcat.compression.models import guess_checkpoint_arch

    if typed.strip() or not upload or not str(upload).lower().endswith(CHECKPOINT_SUFFIXES):
        return gr.skip()
    return guess_checkpoint_arch(upload) or gr.skip()


STOP_REPLIES = {
    "stopping": "**stopping** at the next step…",
    "idle": "nothing is running",
    "other": "another visitor's run is going: only they can stop it",
}


SOURCES = ("embedded", "timm name", "uploaded checkpoint")
MAX_NAME = 200  # characters of a timm name or hub id typed in the page


def model_spec(source: str, name: str = "", upload: str | None = None, arch: str = "") -> tuple[str, str | None]:
    """(SPEC, arch) of the model a user picked, as comcat.load_model takes them; an upload is first
    copied into the app's folder."""
    if source == "embedded":
        return "embedded", None
    if source == "timm name":
        name = name.strip() or "deit_small_patch16_224"
        if len(name) > MAX_NAME:
            raise ComcatError(f"that name is {len(name)} characters long: a timm name or hub id has at most {MAX_NAME}")
        if name.startswith("hf-hub:") and HUB_ID.fullmatch(name.removeprefix("hf-hub:")):
            return name, None  # a timm model on the Hugging Face hub: the hub only, never a path
        if HUB_ID.fullmatch(name):
            return "hf:" + name, None  # a model on the Hugging Face hub, never a server path
        if "/" in name:
            raise ComcatError(f"{name!r} is not a timm model name or a hub id: {HUB_ID_RULE}")
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
            raise ComcatError(
                f"{name!r} is not a timm model name: type one like vit_tiny_patch16_224, a hub id like "
                "google/vit-base-patch16-224, or choose 'uploaded checkpoint' for a file or a zipped model folder"
            )
        return "timm:" + name, None
    if source != "uploaded checkpoint":
        raise ComcatError(f"unknown model source {source!r}")
    if upload and str(upload).lower().endswith(".zip"):  # a zipped model folder (save_pretrained, comcat)
        return str(unzip(upload, "zip of a model folder", kind="models")), None
    path = take_upload(upload, CHECKPOINT_SUFFIXES, "checkpoint")
    if not arch.strip():
        raise ComcatError(
            f"{path.name} is a bare checkpoint: type its architecture in the 'architecture' box, "
            "e.g. vit_tiny_patch16_224"
        )
    return str(path), arch.strip()
