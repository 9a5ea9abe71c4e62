// RefFace: a node's report (reference verdicts, face choices, similarities) shown on the node after each run, its
// warnings marked in colour with a sign, and the node tinted when any line warns. The server sends the report as
// the node's ui output: "text" (lines) and "refface_warnings" (one flag per line).
import { app } from "../../scripts/app.js";

const WARNING_TEXT = "#ffb347";
const WARNING_NODE = { color: "#8a4b08", bgcolor: "#4d2f12" };

function reportElement(node) {
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
      serialize: false,
      getMinHeight: () => 60,
    });
  }
  return widget.element;
}

function showReport(node, lines, warnings) {
  const element = reportElement(node);
  element.replaceChildren(
    ...lines.map((line, i) => {
      const row = document.createElement("div");
      row.textContent = warnings[i] ? `⚠ ${line}` : line;
      if (warnings[i]) {
        row.className = "refface-warning";
        Object.assign(row.style, { color: WARNING_TEXT, fontWeight: "bold" });
      }
      return row;
    }),
  );
  if (node.refface_colours === undefined) node.refface_colours = { color: node.color, bgcolor: node.bgcolor };
  const colours = warnings.some(Boolean) ? WARNING_NODE : node.refface_colours;
  node.color = colours.color;
  node.bgcolor = colours.bgcolor;
  node.setSize([Math.max(node.size[0], 420), node.computeSize()[1] + 18 * Math.min(lines.length, 12)]);
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
  },
});
