// RefFace: a node's report (reference verdicts, face choices, similarities) shown on the node after each run, its
// warnings marked with a sign in orange and an orange outline round the node. The server sends the report as the
// node's ui output: "text" (lines) and "refface_warnings" (one flag per line). Nothing here is saved in the workflow.
import { app } from "../../scripts/app.js";

const WARNING = "#ffb347";
const LINE_HEIGHT = 14;

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === "refface_report");
  if (!widget) {
    const element = document.createElement("div");
    element.className = "refface-report";
    Object.assign(element.style, {
      font: "11px monospace",
      whiteSpace: "pre-wrap",
      overflowY: "auto",
      padding: "4px 6px",
      borderRadius: "4px",
      color: "var(--input-text, #ddd)",
      background: "var(--comfy-input-bg, #222)",
    });
    widget = node.addDOMWidget("refface_report", "refface_report", element, {
      getMinHeight: () => LINE_HEIGHT * Math.min(2 * (node.refface_lines ?? 1), 10) + 12, // a line often wraps
    });
    widget.serialize = false; // a report, not a setting: not in widgets_values
  }
  return widget;
}

function showReport(node, lines, warnings) {
  const widget = reportWidget(node);
  const order = [...lines.keys()].sort((a, b) => warnings[b] - warnings[a]); // warnings first: seen unscrolled
  widget.element.replaceChildren(
    ...order.map((i) => {
      const line = lines[i];
      const row = document.createElement("div");
      row.textContent = warnings[i] ? `⚠ ${line}` : line;
      if (warnings[i]) {
        row.className = "refface-warning";
        Object.assign(row.style, { color: WARNING, fontWeight: "bold" });
      }
      return row;
    }),
  );
  node.refface_lines = lines.length;
  node.refface_warned = warnings.some(Boolean);
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "RefFace.reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("RefFace")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      if (output?.text && output?.refface_warnings) showReport(this, output.text, output.refface_warnings);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.refface_warned || this.flags?.collapsed) return;
      const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
      ctx.save();
      ctx.strokeStyle = WARNING;
      ctx.lineWidth = 3;
      ctx.strokeRect(-2, -title - 2, this.size[0] + 4, this.size[1] + title + 4);
      ctx.fillStyle = WARNING;
      ctx.font = "bold 16px sans-serif";
      ctx.fillText("⚠", this.size[0] - 22, -title / 2 + 6);
      ctx.restore();
    };
  },
});
