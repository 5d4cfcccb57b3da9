// vdit's Empty Latent nodes: a size preset and the typed numbers never disagree on the page.
// Picking a `resolution` (or `duration`) preset writes its numbers into width and height (frames);
// typing a number that differs sets the preset back to "custom"; a saved workflow whose numbers
// disagree with its preset shows the preset's numbers when it loads (the ones it always ran with).
// The Empty Latent Video lists only the presets of the family its model (VDIT Load Model, through
// any model patches) holds, as the server says (/vdit/family_presets).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

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

// the VDIT Load Model a node's model comes from, through model patches and reroutes
function modelLoader(node, seen = new Set()) {
  for (let i = 0; i < (node.inputs?.length ?? 0); i++) {
    if (!["MODEL", "*"].includes(node.inputs[i].type)) continue;
    const up = node.getInputNode?.(i);
    if (!up || seen.has(up.id)) continue;
    seen.add(up.id);
    if (up.comfyClass === "VDITLoadModel") return up;
    const found = modelLoader(up, seen);
    if (found) return found;
  }
  return null;
}

function setChoices(w, list) {
  if (!w) return;
  const values = ["custom", ...list];
  if (!values.includes(w.value)) values.push(w.value); // a saved workflow's preset of another family stays
  w.options = { ...w.options, values }; // (a new object: newer frontends' node views update on assignment)
}

async function narrowPresets(node) {
  const choice = widget(modelLoader(node) ?? {}, "model")?.value;
  if (!choice || node.vditPresetsFor === choice) return; // (asked already: a load changes many links)
  node.vditPresetsFor = choice;
  try {
    const r = await api.fetchApi(`/vdit/family_presets?model=${encodeURIComponent(choice)}`);
    if (!r.ok || node.vditPresetsFor !== choice) return; // unknown weights: every family's presets stay listed
    const presets = await r.json();
    setChoices(widget(node, "resolution"), presets.resolutions);
    setChoices(widget(node, "duration"), presets.durations);
    node.setDirtyCanvas?.(true, true);
  } catch (e) {
    console.warn("vdit: could not narrow the size presets", e);
  }
}

function narrowAll() {
  for (const node of app.graph?._nodes ?? []) {
    if (node.comfyClass === "VDITEmptyLatentVideo") narrowPresets(node);
  }
}

app.registerExtension({
  name: "vdit.sizePresets",
  afterConfigureGraph() {
    narrowAll();
  },
  nodeCreated(node) {
    if (node.comfyClass === "VDITLoadModel") {
      const w = widget(node, "model");
      if (w) chain(w, narrowAll);
      return;
    }
    if (!NODES.includes(node.comfyClass)) return;
    if (node.comfyClass === "VDITEmptyLatentVideo") {
      const changed = node.onConnectionsChange;
      node.onConnectionsChange = function (...args) {
        const result = changed?.apply(this, args);
        narrowPresets(node);
        return result;
      };
    }
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
