// vdit's Empty Latent nodes: a size preset and the typed numbers never disagree on the page.
// Picking a `resolution` (or `duration`) preset writes its numbers into width and height (frames);
// typing a number that differs sets the preset back to "custom"; a saved workflow whose numbers
// disagree with its preset shows the preset's numbers when it loads (the ones it always ran with).
import { app } from "../../scripts/app.js";

const NODES = ["VDITEmptyLatentVideo", "VDITEmptyLatent"];
const PRESETS = {
  // "Open-Sora 360p 16:9 640x360": the size is the last word
  resolution: { targets: ["width", "height"], parse: (v) => (v.match(/ (\d+)x(\d+)$/) || []).slice(1).map(Number) },
  // "Open-Sora 2s (51 frames)": the count in brackets
  duration: { targets: ["frames"], parse: (v) => (v.match(/\((\d+) frames?\)$/) || []).slice(1).map(Number) },
};

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function presetValues(node, preset) {
  const w = widget(node, preset);
  if (!w || w.value === "custom") return null;
  const values = PRESETS[preset].parse(String(w.value));
  return values.length === PRESETS[preset].targets.length ? values : null;
}

function applyPreset(node, preset) {
  const values = presetValues(node, preset);
  if (!values) return;
  PRESETS[preset].targets.forEach((name, i) => {
    const w = widget(node, name);
    if (w) w.value = values[i];
  });
  node.setDirtyCanvas?.(true, true);
}

function chain(w, after) {
  const original = w.callback;
  w.callback = function (...args) {
    const result = original?.apply(this, args);
    after();
    return result;
  };
}

app.registerExtension({
  name: "vdit.sizePresets",
  nodeCreated(node) {
    if (!NODES.includes(node.comfyClass)) return;
    for (const [preset, { targets }] of Object.entries(PRESETS)) {
      const p = widget(node, preset);
      if (!p) continue;
      chain(p, () => applyPreset(node, preset));
      for (const name of targets) {
        const w = widget(node, name);
        if (!w) continue;
        chain(w, () => {
          const values = presetValues(node, preset);
          if (values && targets.some((t, i) => widget(node, t)?.value !== values[i])) {
            p.value = "custom";
            node.setDirtyCanvas?.(true, true);
          }
        });
      }
    }
    const configure = node.onConfigure;
    node.onConfigure = function (...args) {
      const result = configure?.apply(this, args);
      for (const preset of Object.keys(PRESETS)) applyPreset(node, preset);
      return result;
    };
  },
});
