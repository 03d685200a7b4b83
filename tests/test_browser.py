"""The example workflows in the real ComfyUI frontend: headless Chromium (Debian's
``chromium``) driven by Playwright (the Python package; no browser download) opens
the frontend that the test server serves, opens the template browser, picks this
pack's entry and loads each file of ``example_workflows/`` from it, as a user does
(its card shows the thumbnail and the file name, in full, as the title).

For each workflow it asserts that the frontend reports no missing node types (its
own missing-nodes check) and no invalid widget values: every widget keeps the value
of the file, numbers lie within the widget's range, combo values are among the
widget's options (model and image files aside: no weights here), and the prompt the
frontend builds from the graph (``app.graphToPrompt``, what the Run button sends)
passes the server's validation except for those missing files.  It takes a
screenshot of each loaded graph (pytest's temp folder, or ``docs/screenshots/`` with
``GNRI_UPDATE_SCREENSHOTS=1``).

Skipped, with the reason, when Playwright or Chromium is not installed
(``scripts/setup_env.sh`` installs both when CI=true or GNRI_BROWSER_TESTS=1).
Chromium: ``GNRI_CHROMIUM`` or /usr/bin/chromium.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import requests

from conftest import PACK_LINK_NAME
from gnri_testing import comfy_env

pytestmark = pytest.mark.server

WORKFLOW_DIR = os.path.join(comfy_env.REPO_ROOT, "example_workflows")
FILES = sorted(f for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json")) if os.path.isdir(WORKFLOW_DIR) else []
CHROMIUM = os.environ.get("GNRI_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT_DIR = os.path.join(comfy_env.REPO_ROOT, "docs", "screenshots")
# Combo inputs that name files the user provides (checkpoints, images): not in the
# (empty) lists of the test server, so "not in list" is expected for them.
FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name",
               "lora_name", "control_net_name", "image", "latent"}
VIEWPORT = {"width": 1800, "height": 1000}


def browser_unavailable() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return (f"the Playwright Python package is not installed ({exc}); "
                "`pip install playwright` (no browser download needed) or run with CI=true / "
                "GNRI_BROWSER_TESTS=1 so scripts/setup_env.sh installs it")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return (f"no Chromium at {CHROMIUM} (set GNRI_CHROMIUM); on Debian `apt-get install chromium`, "
                "which scripts/setup_env.sh does when CI=true or GNRI_BROWSER_TESTS=1")
    return None


@pytest.fixture(scope="module")
def browser():
    reason = browser_unavailable()
    if reason:
        pytest.skip(f"browser test skipped: {reason}")
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as pw:
        try:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except Error as exc:
            pytest.skip(f"browser test skipped: Chromium at {CHROMIUM} does not start: {exc}")
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def frontend(browser, comfy_server):
    """A page with ComfyUI's frontend loaded from the test server (first-run template
    dialog and banners off, text drawn at every zoom, no minimap)."""
    requests.post(comfy_server.base_url + "/api/settings", timeout=10, json={
        "Comfy.TutorialCompleted": True,
        "Comfy.Minimap.Visible": False,
        "LiteGraph.Canvas.MinFontSizeForLOD": 0,
        "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
    }).raise_for_status()
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    page = context.new_page()
    page.console_messages = []
    page.on("console", lambda m: page.console_messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: page.console_messages.append(f"pageerror: {e}"))
    page.goto(comfy_server.base_url + "/")
    page.wait_for_function("() => window.app && window.app.vueAppReady && window.app.graph && window.LiteGraph"
                           " && Object.keys(window.LiteGraph.registered_node_types).includes('GNRIInvert')",
                           timeout=120_000)
    page.evaluate("""() => {
        window.__gnriMissing = [];
        const original = window.app.showMissingNodesError.bind(window.app);
        window.app.showMissingNodesError = (missing) => { window.__gnriMissing.push(...missing); return original(missing); };
    }""")
    yield page
    context.close()


def load(name: str) -> dict:
    with open(os.path.join(WORKFLOW_DIR, name)) as f:
        return json.load(f)


def screenshot_name(stem: str) -> str:
    """docs/screenshots/ file name of a workflow: its title in lower case without dots,
    words joined by '_' ("GNRI - SD1.5 invert" -> gnri_sd15_invert.png)."""
    return "_".join(re.findall(r"[a-z0-9]+", stem.lower().replace(".", ""))) + ".png"


# what the card's title shows in full: one line (line-clamp-1) not cut off
CARD_TITLE = """(h3) => ({text: h3.textContent.trim(), full: h3.scrollWidth <= h3.clientWidth
                                                   && h3.scrollHeight <= h3.clientHeight + 1})"""


def open_from_template_browser(page, stem: str) -> None:
    """Opens the pack's templates, checks the card's thumbnail loaded and its title reads
    the file name in full, loads the workflow."""
    page.keyboard.press("Escape")
    page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_text(PACK_LINK_NAME, exact=True).first.click(timeout=30_000)
    card = page.locator(f'[data-testid="template-workflow-{stem}"]')
    thumbnail = card.locator(f'img[alt="{stem}"]').first   # src: a blob of <stem>.jpg
    thumbnail.wait_for(timeout=30_000)
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle(),
                           timeout=30_000)
    title = card.locator("h3").first.evaluate(CARD_TITLE)
    assert title == {"text": stem, "full": True}, f"the card's title: {title}"
    card.click(timeout=30_000)


INSPECT = """() => {
  const app = window.app;
  const problems = [];
  for (const node of app.graph.nodes) {
    if (node.has_errors) problems.push(`#${node.id} ${node.type}: marked as an error node`);
    for (const w of node.widgets || []) {
      const o = w.options || {};
      if (w.type === 'number') {
        if (typeof w.value !== 'number' || !Number.isFinite(w.value))
          problems.push(`#${node.id} ${node.type}.${w.name}: not a number: ${JSON.stringify(w.value)}`);
        else if ((o.min !== undefined && w.value < o.min) || (o.max !== undefined && w.value > o.max))
          problems.push(`#${node.id} ${node.type}.${w.name}: ${w.value} outside [${o.min}, ${o.max}]`);
      } else if (w.type === 'combo') {
        const values = typeof o.values === 'function' ? o.values() : (o.values || []);
        if (!values.includes(w.value))
          problems.push(`combo #${node.id} ${node.type}.${w.name}: ${JSON.stringify(w.value)} not among ${values.length} options`);
      } else if (w.type === 'toggle' && typeof w.value !== 'boolean') {
        problems.push(`#${node.id} ${node.type}.${w.name}: not a boolean: ${JSON.stringify(w.value)}`);
      }
    }
  }
  const ds = app.canvas.ds;
  // layout: node boxes with their title bars; the zoom at which the graph fits a 1080p window
  const boxes = app.graph.nodes.map(n => ({id: n.id, r: n.boundingRect}));
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i].r, b = boxes[j].r;
    if (a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3])
      overlaps.push([boxes[i].id, boxes[j].id]);
  }
  const x0 = Math.min(...boxes.map(b => b.r[0])), y0 = Math.min(...boxes.map(b => b.r[1]));
  const x1 = Math.max(...boxes.map(b => b.r[0] + b.r[2])), y1 = Math.max(...boxes.map(b => b.r[1] + b.r[3]));
  const fit1080 = Math.min((1920 - 48) / (x1 - x0), (1080 - 48) / (y1 - y0));
  return {missing: window.__gnriMissing.slice(), problems, serialized: app.graph.serialize(),
          count: app.graph.nodes.length, scale: ds.scale, overlaps, fit1080};
}"""
FIT_1080_MIN = 0.85   # graphs read at the zoom that fits them into a 1080p window


def screenshot(page, path: str) -> None:
    """Focus mode (no side bar or menus), fit the graph to the viewport, then take the
    graph's bounding box."""
    page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')")
    page.wait_for_timeout(300)
    box = page.evaluate("""() => {
      const app = window.app, ds = app.canvas.ds, el = app.canvas.canvas;
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const n of app.graph.nodes) {
        const title = n.constructor.title_mode === 1 ? 0 : 30;
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
      }
      const rect = el.getBoundingClientRect(), margin = 24;
      const scale = Math.min((rect.width - 2 * margin) / (x1 - x0), (rect.height - 2 * margin) / (y1 - y0));
      ds.scale = scale;
      ds.offset[0] = (rect.width - scale * (x1 - x0)) / 2 / scale - x0;
      ds.offset[1] = (rect.height - scale * (y1 - y0)) / 2 / scale - y0;
      app.canvas.setDirty(true, true); app.canvas.draw(true, true);
      const left = rect.left + (x0 + ds.offset[0]) * scale - margin, top = rect.top + (y0 + ds.offset[1]) * scale - margin;
      return {x: Math.max(0, left), y: Math.max(0, top),
              width: (x1 - x0) * scale + 2 * margin, height: (y1 - y0) * scale + 2 * margin};
    }""")
    page.wait_for_timeout(300)
    try:
        page.screenshot(path=path, clip=box)
    finally:
        page.evaluate("() => window.app.extensionManager.command.execute('Workspace.ToggleFocusMode')")


def test_template_endpoint_lists_every_example_workflow(comfy_server):
    listed = comfy_server.get("/api/workflow_templates").get(PACK_LINK_NAME, [])
    assert sorted(listed) == sorted(f[:-5] for f in FILES)


@pytest.mark.parametrize("name", FILES)
def test_template_title_is_readable(name):
    """The file name is the card's title (frontend 1.32.9): words, the pack's name first;
    letters, digits, spaces and .,()- only (no other escaping in URLs, valid on Windows)."""
    stem = name[:-5]
    assert stem.startswith("GNRI - ") and "_" not in stem, stem
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 .,()-]*[A-Za-z0-9)]", stem), stem
    assert os.path.isfile(os.path.join(WORKFLOW_DIR, stem + ".jpg")), f"no thumbnail {stem}.jpg"


@pytest.mark.parametrize("name", FILES)
def test_template_thumbnail_is_served(comfy_server, name):
    """The frontend (1.32.9) shows /api/workflow_templates/<pack>/<name>.jpg on the card."""
    r = requests.get(f"{comfy_server.base_url}/api/workflow_templates/{PACK_LINK_NAME}/{name[:-5]}.jpg", timeout=10)
    assert r.status_code == 200 and r.content[:3] == b"\xff\xd8\xff", (r.status_code, r.content[:16])


@pytest.mark.skipif(not FILES, reason="example_workflows/ has no .json file yet")
@pytest.mark.parametrize("name", FILES)
def test_workflow_loads_in_frontend(frontend, comfy_server, name, tmp_path):
    page, workflow, stem = frontend, load(name), name[:-5]
    page.evaluate("() => { window.__gnriMissing = []; }")
    open_from_template_browser(page, stem)
    page.wait_for_function("(n) => window.app.graph.nodes.length === n", arg=len(workflow["nodes"]),
                           timeout=30_000)
    page.wait_for_timeout(500)
    state = page.evaluate(INSPECT)

    assert state["missing"] == [], f"the frontend reports missing node types: {state['missing']}"
    assert state["overlaps"] == [], f"overlapping nodes (ids): {state['overlaps']}"
    assert state["fit1080"] >= FIT_1080_MIN, f"fits a 1080p window at {state['fit1080']:.0%} zoom only"
    print(f"\n{stem}: fits 1080p at {state['fit1080']:.0%} zoom")
    file_problems = [p for p in state["problems"]
                     if not (p.startswith("combo") and p.split(".", 1)[1].split(":")[0] in FILE_INPUTS)]
    assert file_problems == [], "\n".join(file_problems)

    # every widget value as in the file (no value shifted into another widget or reset);
    # the frontend may append values of its own widgets (LoadImage's upload button)
    loaded = {n["id"]: n for n in state["serialized"]["nodes"]}
    for node in workflow["nodes"]:
        if "widgets_values" in node:
            values = loaded[node["id"]].get("widgets_values") or []
            assert values[:len(node["widgets_values"])] == node["widgets_values"], (node["id"], node["type"], values)

    # the prompt the Run button would send passes the server's validation, but for the files
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    r = requests.post(comfy_server.base_url + "/prompt", json={"prompt": prompt, "client_id": "gnri-browser"},
                      timeout=30)
    node_errors = r.json().get("node_errors", {}) if r.headers.get("content-type", "").startswith(
        "application/json") else {}
    unexpected = [(node_id, e) for node_id, ne in node_errors.items() for e in ne["errors"]
                  if not (e["type"] in ("value_not_in_list", "custom_validation_failed")
                          and (e.get("extra_info") or {}).get("input_name") in FILE_INPUTS)]
    assert not unexpected, unexpected
    if r.status_code == 200:  # nothing of it needs a file: it was queued; stop it
        requests.post(comfy_server.base_url + "/interrupt", timeout=10)

    path = str(tmp_path / screenshot_name(stem))
    screenshot(page, path)
    if os.environ.get("GNRI_UPDATE_SCREENSHOTS") == "1":
        os.makedirs(SCREENSHOT_DIR, exist_ok=True)
        shutil.copy(path, os.path.join(SCREENSHOT_DIR, screenshot_name(stem)))
    print(f"\nscreenshot: {path}")


def report_prompt() -> dict:
    """Tiny models (API format): GNRI Invert (its report) and Attention Mask Blend with
    identical prompts (a warning)."""
    text = "a photo of a cat on a sofa"

    def node(kind, **inputs):
        return {"class_type": kind, "inputs": inputs}

    return {
        "1": node("GNRITestTinyModel", family="eps", dtype="fp32", seed=0),
        "2": node("GNRITestLatent", family="eps", batch=1, width=128, height=128, seed=0),
        "3": node("CLIPTextEncode", clip=["1", 1], text=text),
        "4": node("GNRIInvert", model=["1", 0], positive=["3", 0], latent=["2", 0], steps=3, scheduler="simple",
                  cfg=1.0, method="gnri", iterations=2, tolerance=0.0, lam=0.1, sampler="euler",
                  newton_form="secant", noise_seed=0),
        "5": node("GNRIAttentionMaskBlend", model=["1", 0], clip=["1", 1], inversion=["4", 3], source_prompt=text,
                  target_prompt=text, threshold=0.6, blur=1.0, dilate=1, step=-1),
        "6": node("MaskToImage", mask=["5", 0]),
        "7": node("PreviewImage", images=["6", 0]),
        "8": node("GNRITestLatentStats", latent_a=["2", 0], latent_b=["4", 0]),
    }


# the report boxes a user sees: displayed, and laid out at a readable size
REPORTS = """() => Array.from(document.querySelectorAll('.gnri-report'))
    .filter(e => e.offsetParent !== null && e.getBoundingClientRect().width > 50
                 && e.getBoundingClientRect().height > 20).map(e => e.textContent)"""


def test_reports_and_warnings_are_drawn_on_nodes(frontend, tmp_path):
    """Run from the frontend (the Run button's queuePrompt): GNRI Invert's report and
    Attention Mask Blend's warning are drawn on the nodes; λ is labelled."""
    page = frontend
    page.keyboard.press("Escape")
    page.evaluate("(p) => window.app.loadApiJson(p, 'gnri_node_reports')", report_prompt())
    page.wait_for_function("() => window.app.graph.nodes.length === 8", timeout=30_000)

    label = page.evaluate("""() => window.app.graph.getNodeById(4).widgets.find(w => w.name === 'lam').label""")
    assert label == "λ (guidance)"

    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function(f"""() => {{ const t = ({REPORTS})();
        return t.some(s => s.includes('model calls')) && t.some(s => s.includes('warning:')); }}""",
                           timeout=120_000)
    texts = page.evaluate(REPORTS)
    report = next(t for t in texts if "model calls" in t)
    assert "step 3:" in report and "residual" in report, report
    warning = next(t for t in texts if "warning:" in t)
    assert "tokenises the same as source_prompt" in warning, warning

    path = str(tmp_path / "gnri_node_reports.png")
    screenshot(page, path)
    if os.environ.get("GNRI_UPDATE_SCREENSHOTS") == "1":
        os.makedirs(SCREENSHOT_DIR, exist_ok=True)
        shutil.copy(path, os.path.join(SCREENSHOT_DIR, "gnri_node_reports.png"))
    print(f"\nscreenshot: {path}")
