// ComfyUI-GNRI frontend extension (stock ComfyUI frontend, loaded through WEB_DIRECTORY).
// 1. Draws each pack node's text report (ui "text": model calls, per-step residuals,
//    warnings) on the node after a run; the stock frontend receives it but shows nothing.
// 2. Labels widgets with their input's display_name (the frontend labels widgets with
//    the input id, e.g. "lam" for "λ (guidance)").
import { app } from "../../scripts/app.js";

// served at /extensions/<pack folder>/gnri.js; ComfyUI names the pack's nodes'
// python_module "custom_nodes.<pack folder>"
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2]);
const REPORT = "gnri_report";

function inputLabels(nodeData) {
  const labels = {};
  for (const group of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData.input?.[group] ?? {})) {
      const label = spec?.[1]?.display_name;
      if (label) labels[name] = label;
    }
  }
  return labels;
}

function wrappedLines(text, width) {
  const columns = Math.max(20, Math.floor((width - 40) / 6.6));  // 11px monospace
  return text.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / columns)), 0);
}

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === REPORT);
  if (widget) return widget;
  const element = document.createElement("div");
  element.className = "gnri-report";
  Object.assign(element.style, {
    whiteSpace: "pre-wrap", overflow: "auto", fontFamily: "monospace", fontSize: "11px",
    lineHeight: "14px", padding: "4px 6px", boxSizing: "border-box", borderRadius: "4px",
    background: "var(--comfy-input-bg, #222)", color: "var(--input-text, #ddd)", userSelect: "text",
  });
  widget = node.addDOMWidget(REPORT, "gnri_report", element, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => element.textContent,
    setValue: (v) => { element.textContent = v; },
    getMinHeight: () => Math.min(wrappedLines(element.textContent, node.size[0]), 10) * 14 + 12,
  });
  widget.serialize = false;
  return widget;
}

function showReport(node, text) {
  if (!text && !node.widgets?.some((w) => w.name === REPORT)) return;
  const widget = reportWidget(node);
  const element = widget.element;
  element.textContent = text;
  const warned = /^warning:/m.test(text);
  element.classList.toggle("gnri-warning", warned);
  element.style.display = text ? "" : "none";
  element.style.border = warned ? "2px solid #e0a030" : "1px solid transparent";
  element.title = warned ? "This node has warnings (lines starting with 'warning:')" : "";
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "comfyui-gnri.reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.python_module !== `custom_nodes.${PACK}`) return;
    const labels = inputLabels(nodeData);
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      for (const widget of this.widgets ?? []) {
        if (labels[widget.name]) widget.label = labels[widget.name];
      }
      return result;
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = executed?.apply(this, arguments);
      showReport(this, (output?.text ?? []).join("\n"));
      return result;
    };
  },
});
