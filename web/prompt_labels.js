// Visible labels on the pack's multiline prompt boxes (Attention Mask Blend's source and
// target prompts): the stock frontend draws no label for a textarea widget, only its
// placeholder while it is empty. The label (the input's display_name) is drawn in the
// box's top line, above the text, whatever the box holds.
import { app } from "../../scripts/app.js";

// served at /extensions/<pack folder>/prompt_labels.js; the pack's nodes' python_module
// is "custom_nodes.<pack folder>"
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/")[2]);

function displayName(nodeData, name) {
  const spec = nodeData.input?.required?.[name] ?? nodeData.input?.optional?.[name];
  return spec?.[1]?.display_name;
}

function labelBox(textarea, label) {
  const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="400" height="14"><text x="2" y="10" `
    + `font-family="sans-serif" font-size="10" fill="#999">${label.replace(/[<&"]/g, "")}</text></svg>`;
  Object.assign(textarea.style, {
    backgroundImage: `url("data:image/svg+xml,${encodeURIComponent(svg)}")`,
    backgroundRepeat: "no-repeat", backgroundPosition: "2px 1px", paddingTop: "14px",
  });
  textarea.dataset.gnriLabel = label;
}

app.registerExtension({
  name: "comfyui-gnri.prompt-labels",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.python_module !== `custom_nodes.${PACK}`) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      for (const widget of this.widgets ?? []) {
        const label = displayName(nodeData, widget.name);
        if (label && widget.inputEl instanceof HTMLTextAreaElement) labelBox(widget.inputEl, label);
      }
      return result;
    };
  },
});
