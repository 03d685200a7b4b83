"""pytest fixtures that run a real ComfyUI (see gnri_testing/comfy_env.py for how it is found).

Session fixtures
  comfy        -> the ``comfy`` package (ComfyUI imported in-process, --cpu,
                  folders in a temp base dir ``comfy_env.BASE_DIR``)
  tiny_eps / tiny_v / tiny_flux -> ModelPatcher (fp32, CPU, seed 0) from gnri_testing.tiny_models
  tiny_clip    -> comfy.sd.CLIP (SD1ClipModel + SD1Tokenizer, 2 layers, random)
  comfy_nodes  -> ComfyUI's ``nodes`` module with stock + comfy_extras nodes, this
                  pack (repo root) and tests/testing_pack loaded (as ComfyUI does)
  executor     -> ComfyExecutor: ComfyUI's own validate_prompt + PromptExecutor in
                  this process:  run(prompt, outputs=None, *, keep_cache=False,
                  on_progress=None) -> {node_id: ui}; node_output(node_id) -> tuple;
                  events(name) -> [data]; validate(prompt) -> ComfyUI's tuple
  comfy_server -> ComfyClient for a real ``python main.py`` server subprocess with the
                  pack and the testing pack in its custom_nodes (started early, at
                  collection, when a selected test needs it)
  make_prompt  -> ``unet_prompt`` (an API-format tiny-model -> KSampler -> stats prompt)

Errors: PromptValidationError (prompt rejected, names node/class/input) and
PromptExecutionError (a node raised; node_id, node_type, exception_type,
exception_message; ``interrupted`` for interruptions), for both executor and server;
import them with ``from conftest import ...``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid

import pytest

from gnri_testing import comfy_env  # noqa: E402  (first: makes ComfyUI importable)
from gnri_testing import tiny_models

from gnri_testing.comfy_server import ComfyServer, ServerError  # noqa: E402,F401  (ServerError: for tests)

REPO_ROOT = comfy_env.REPO_ROOT
TESTING_PACK_DIR = comfy_env.TESTING_PACK_DIR
PACK_LINK_NAME = "ComfyUI-GNRI"          # folder name of the pack in the server's custom_nodes
TESTING_PACK_LINK_NAME = "gnri_testing_pack"
SERVER_START_TIMEOUT = float(os.environ.get("GNRI_SERVER_START_TIMEOUT", "90"))


# --------------------------------------------------------------------------- collection

@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    """The repo root is a ComfyUI pack with an ``__init__.py``, so pytest collects it
    as a Package and, before the first test, imports it as a top-level package named
    after the checkout folder (``main``, ``ComfyUI-GNRI`` ...) with the folder's
    PARENT put first on sys.path.  That imports the pack a second time under a
    wrong name (ComfyUI loads it as a custom node, tests import ``gnri_core``), may
    shadow ComfyUI's main.py, and exposes sibling folders of the checkout.  The
    package has no setup_module, so skip that import.

    Also starts the ComfyUI server early if a selected test uses ``comfy_server``."""
    if not config.option.collectonly:
        _prestart_server(items)
    root = os.path.realpath(REPO_ROOT)
    for item in items:
        for node in item.listchain():
            if isinstance(node, pytest.Package) and os.path.realpath(str(node.path)) == root:
                node.setup = lambda: None
                break


# --------------------------------------------------------------------------- models

@pytest.fixture(scope="session")
def comfy():
    import comfy as comfy_pkg
    import comfy.model_management  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.samplers  # noqa: F401

    return comfy_pkg


@pytest.fixture(scope="session")
def tiny_eps(comfy):
    return tiny_models.tiny_eps_model()


@pytest.fixture(scope="session")
def tiny_v(comfy):
    return tiny_models.tiny_v_model()


@pytest.fixture(scope="session")
def tiny_flux(comfy):
    return tiny_models.tiny_flux_model()


@pytest.fixture(scope="session")
def tiny_clip(comfy):
    return tiny_models.tiny_clip()


# --------------------------------------------------------------------------- in-process executor

class PromptValidationError(Exception):
    """ComfyUI's ``validate_prompt`` rejected the prompt (what POST /prompt answers 400 to).

    ``error`` is ComfyUI's error dict, ``node_errors`` maps node id ->
    {"errors": [{"type", "message", "details", "extra_info": {"input_name", ...}}],
    "class_type", ...}.  ``str(exc)`` lists every reason with node, class and input name.
    """

    def __init__(self, error: dict, node_errors: dict):
        self.error = error or {}
        self.node_errors = node_errors or {}
        lines = [f"{self.error.get('message', 'invalid prompt')}: {self.error.get('details', '')}".rstrip(": ")]
        for node_id, ne in self.node_errors.items():
            for r in ne.get("errors", []):
                inp = (r.get("extra_info") or {}).get("input_name")
                where = f" input '{inp}'" if inp else ""
                lines.append(f"  {ne.get('class_type')} #{node_id}{where}: {r.get('message')}: {r.get('details')}")
        super().__init__("\n".join(lines))


class PromptExecutionError(Exception):
    """A node raised while the prompt ran (ComfyUI's ``execution_error`` message).

    Attributes: ``node_id``, ``node_type``, ``exception_type`` (e.g. "ValueError"),
    ``exception_message`` (the node's message; ComfyUI may append a tip line),
    ``traceback`` (list of str), ``message`` (the whole execution_error dict).
    ``str(exc)`` = "<node_type> #<node_id> raised <exception_type>: <message>".
    """

    def __init__(self, message: dict, interrupted: bool = False):
        self.message = message
        self.interrupted = interrupted
        self.node_id = message.get("node_id")
        self.node_type = message.get("node_type")
        self.exception_type = message.get("exception_type", "InterruptProcessingException" if interrupted else "")
        self.exception_message = message.get("exception_message", "interrupted" if interrupted else "")
        self.traceback = message.get("traceback", [])
        text = f"{self.node_type} #{self.node_id} raised {self.exception_type}: {self.exception_message}".rstrip()
        if self.traceback:
            text += "\n" + "".join(self.traceback[-3:]).rstrip()
        super().__init__(text)


class _FakeServer:
    """What PromptExecutor needs of ComfyUI's PromptServer; records every message."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node_id": node_id, "text": text}))

    def queue_updated(self):
        pass


class ComfyExecutor:
    """Runs API-format prompts through ComfyUI's own ``validate_prompt`` + ``PromptExecutor``
    (under ``torch.inference_mode()``, as the server does), in this process."""

    CLIENT_ID = "gnri-tests"

    def __init__(self):
        import execution

        self._execution = execution
        self.server = _FakeServer()
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
        self.messages: list[tuple[str, object]] = []   # (event, data) of the last run
        self.last_prompt_id: str | None = None
        self.last_ui: dict = {}

    # -- API
    def validate(self, prompt: dict, outputs: list[str] | None = None):
        """-> ComfyUI's tuple (ok, error, good_output_ids, node_errors)."""
        return asyncio.run(self._execution.validate_prompt(str(uuid.uuid4()), prompt, outputs))

    def run(self, prompt: dict, outputs: list[str] | None = None, *, keep_cache: bool = False,
            on_progress=None) -> dict:
        """Validate and execute ``prompt`` (API format: {node_id: {"class_type", "inputs"}}).

        Returns the UI outputs of the output nodes, {node_id: ui_dict} (what
        /history/<id> shows under "outputs"), e.g. {"9": {"gnri_stats": [...]}}.
        ``outputs``: only these output node ids (partial execution).  Caches are reset
        before each run (every node executes) unless ``keep_cache`` (then ComfyUI's
        cross-prompt caching applies, as in the server).  ``on_progress(value, total,
        node_id)`` is called on every ProgressBar update (call
        ``nodes.interrupt_processing()`` in it to test interruption).
        Raises PromptValidationError / PromptExecutionError (interrupted: ``.interrupted``).
        """
        import comfy.utils

        ok, error, good_outputs, node_errors = self.validate(prompt, outputs)
        if not ok or node_errors:  # stricter than the server, which runs the valid outputs
            raise PromptValidationError(error or {"message": "Some outputs failed validation"}, node_errors)
        if not keep_cache:
            self.executor.reset()
        prompt_id = str(uuid.uuid4())
        self.last_prompt_id = prompt_id
        self.server.last_prompt_id = prompt_id
        self.server.messages = []
        self.server.sockets_metadata = {}
        previous_hook = comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self._progress_hook(on_progress))
        try:
            self.executor.execute(prompt, prompt_id, {"client_id": self.CLIENT_ID}, good_outputs)
        finally:
            comfy.utils.set_progress_bar_global_hook(previous_hook)
            self.messages = list(self.server.messages)
        for event, data in self.executor.status_messages:
            if event == "execution_error":
                raise PromptExecutionError(data)
            if event == "execution_interrupted":
                raise PromptExecutionError(data, interrupted=True)
        if not self.executor.success:
            raise PromptExecutionError({"exception_message": "execution failed (no error message)"})
        self.last_ui = dict(self.executor.history_result["outputs"])
        return self.last_ui

    def node_output(self, node_id: str):
        """Outputs of ``node_id`` from the last run (any node, not only output nodes):
        a tuple with one value per output slot (the list for list outputs)."""
        entry = self.executor.caches.outputs.get(str(node_id))
        if entry is None:
            raise KeyError(f"no cached output for node {node_id!r} (not executed in the last run?)")
        return tuple(o[0] if isinstance(o, list) and len(o) == 1 else o for o in entry.outputs)

    def events(self, name: str) -> list:
        """Data of the messages named ``name`` ("executing", "progress", "executed",
        "execution_error", "progress_state", ...) sent during the last run."""
        return [d for e, d in self.messages if e == name]

    # -- internals
    def _progress_hook(self, on_progress):
        import comfy.model_management
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context

        server = self.server

        def hook(value, total, preview_image, prompt_id=None, node_id=None):
            ctx = get_executing_context()
            if prompt_id is None and ctx is not None:
                prompt_id = ctx.prompt_id
            if node_id is None and ctx is not None:
                node_id = ctx.node_id
            if on_progress is not None:
                on_progress(value, total, node_id)
            comfy.model_management.throw_exception_if_processing_interrupted()
            if node_id is None:
                node_id = server.last_node_id
            server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id or server.last_prompt_id,
                                          "node": node_id}, server.client_id)
            if ctx is not None:
                get_progress_state().update_progress(node_id, value, total, preview_image)

        return hook


def _load_nodes():
    """init_extra_nodes (stock + comfy_extras, no API nodes) and load the two packs the
    way ComfyUI does; raise with ComfyUI's logged traceback if one fails to import."""
    import hook_breaker_ac10a0
    import nodes

    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Collect(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        async def load():
            hook_breaker_ac10a0.save_functions()
            await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
            base = set(nodes.NODE_CLASS_MAPPINGS)
            results = {}
            for path in (REPO_ROOT, TESTING_PACK_DIR):
                records.clear()
                results[path] = (await nodes.load_custom_node(path, base, module_parent="custom_nodes"),
                                 "\n".join(r.getMessage() for r in records))
            hook_breaker_ac10a0.restore_functions()
            return results

        results = asyncio.run(load())
    finally:
        root.removeHandler(handler)
    for path, (ok, log) in results.items():
        if not ok:
            raise RuntimeError(f"ComfyUI failed to load the node pack {path}:\n{log}")
    import server

    if getattr(server.PromptServer, "instance", None) is None:  # a few nodes message the server
        server.PromptServer.instance = _FakeServer()
    return nodes


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    """ComfyUI's ``nodes`` module after loading stock, extra, pack and testing-pack nodes."""
    return _load_nodes()


@pytest.fixture(scope="session")
def executor(comfy_nodes) -> ComfyExecutor:
    return ComfyExecutor()


# --------------------------------------------------------------------------- HTTP server

class ComfyClient(ComfyServer):
    """A running ``python main.py`` (real ComfyUI server) and its HTTP client
    (``gnri_testing/comfy_server.py``), raising the tests' error types."""

    CLIENT_PREFIX = "gnri-tests-"

    def rejected(self, data: dict) -> Exception:
        return PromptValidationError(data.get("error", {}), data.get("node_errors", {}))

    def failed(self, event: str, data: dict) -> Exception:
        return PromptExecutionError(data, interrupted=event == "execution_interrupted")

    def wait(self, prompt_id: str, timeout: float = 60.0) -> dict:
        return super().wait(prompt_id, timeout)

    def run(self, prompt: dict, timeout: float = 60.0) -> dict:
        return super().run(prompt, timeout)

    def log_tail(self, lines: int = 60) -> str:
        return f"--- ComfyUI server log tail ({self.log_path}) ---\n" + super().log_tail(lines)


def _die_with_parent():  # Linux: the server gets SIGTERM if pytest dies (CI timeouts, kill -9)
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def launch_comfy_server(base_dir: str) -> ComfyClient:
    """Start ComfyUI's main.py (not waiting for it) with the pack and the testing pack
    symlinked into ``base_dir``/custom_nodes; only those two custom node folders load."""
    links = {PACK_LINK_NAME: REPO_ROOT, TESTING_PACK_LINK_NAME: TESTING_PACK_DIR}
    return ComfyClient.launch(comfy_env.COMFYUI_PATH, base_dir, links, cpu=True,
                              preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


def wait_until_ready(client: ComfyClient, timeout: float = SERVER_START_TIMEOUT) -> ComfyClient:
    client.wait_until_ready(timeout)
    return client


def start_comfy_server(base_dir: str, timeout: float = SERVER_START_TIMEOUT) -> ComfyClient:
    """launch_comfy_server + wait_until_ready."""
    return wait_until_ready(launch_comfy_server(base_dir), timeout)


_prestarted: ComfyClient | None = None  # launched at collection time when a test will need it


def _prestart_server(items) -> None:
    """Start the server as soon as collection shows a test needs it, so its ~8 s
    start-up overlaps the in-process tests."""
    global _prestarted
    if _prestarted is None and any("comfy_server" in getattr(i, "fixturenames", ()) for i in items):
        import tempfile

        _prestarted = launch_comfy_server(tempfile.mkdtemp(prefix="gnri-comfy-server-"))


def pytest_sessionfinish(session, exitstatus):
    if _prestarted is not None:
        _prestarted.stop()
        if exitstatus == 0:
            import shutil

            shutil.rmtree(_prestarted.base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyClient:
    """A real ComfyUI server subprocess (see ComfyClient); stopped at session end."""
    client = _prestarted or launch_comfy_server(str(tmp_path_factory.mktemp("comfy-server")))
    try:
        yield wait_until_ready(client)
    finally:
        client.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        client = getattr(item, "funcargs", {}).get("comfy_server")
        if client is not None:
            rep.sections.append(("ComfyUI server log", client.log_tail()))


# --------------------------------------------------------------------------- prompt helpers

def unet_prompt(family: str = "eps", *, steps: int = 2, seed: int = 0, text: str = "a photo of a cat",
                width: int = 64, height: int = 64, batch: int = 1, dtype: str = "fp32",
                sampler_name: str = "euler", scheduler: str = "normal", cfg: float = 1.0,
                denoise: float = 1.0) -> dict:
    """API-format prompt: GNRITestTinyModel -> CLIPTextEncode (x2) / GNRITestConditioning
    (flow) + GNRITestLatent -> KSampler -> GNRITestLatentStats("9": latent vs sample).
    Node ids: "1" model, "2" positive, "3" negative, "4" latent, "5" KSampler, "9" stats."""
    prompt = {
        "1": {"class_type": "GNRITestTinyModel", "inputs": {"family": family, "dtype": dtype, "seed": 0}},
        "4": {"class_type": "GNRITestLatent", "inputs": {"family": family, "batch": batch, "width": width,
                                                          "height": height, "seed": seed}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
            "denoise": denoise}},
        "9": {"class_type": "GNRITestLatentStats", "inputs": {"latent_a": ["4", 0], "latent_b": ["5", 0]}},
    }
    if family == "flow":
        prompt["2"] = {"class_type": "GNRITestConditioning",
                       "inputs": {"family": "flow", "batch": 1, "seed": seed, "length": 8}}
        prompt["3"] = {"class_type": "GNRITestConditioning",
                       "inputs": {"family": "flow", "batch": 1, "seed": seed + 1, "length": 8}}
    else:
        prompt["2"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}}
        prompt["3"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}}
    return json.loads(json.dumps(prompt))


@pytest.fixture(scope="session")
def make_prompt():
    """The ``unet_prompt`` builder (see its docstring) as a fixture."""
    return unet_prompt
