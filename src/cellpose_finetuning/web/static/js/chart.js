// The live training chart: losses (train, test) and validation F1 per epoch,
// drawn on a canvas by this small module (no charting library).

export const COLORS = {
  train: "#1f6feb", // blue
  test: "#e36209", // orange
  f1: "#1a7f37", // green
  base: "#6e7781", // grey: the starting model's AP@0.5
  final: "#24292f", // black: the fine-tuned model's AP@0.5
  axis: "#57606a",
  grid: "#d8dee4",
};

function niceStep(range, ticks) {
  const raw = range / Math.max(1, ticks);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000 || a < 0.01) return v.toExponential(0);
  return String(Number(v.toPrecision(3)));
}

/** Points [epoch, value] of a per-epoch list; null entries (no validation) are skipped. */
export function points(values) {
  return (values || [])
    .map((v, i) => [i + 1, v])
    .filter(([, v]) => v !== null && v !== undefined && Number.isFinite(v));
}

function drawPanel(ctx, box, { title, series, xMax, yMin, yMax }) {
  const { x, y, w, h } = box;
  const left = x + 48;
  const right = x + w - 10;
  const top = y + 26;
  const bottom = y + h - 34;
  ctx.fillStyle = "#24292f";
  ctx.font = "600 13px system-ui, sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(title, x + 8, y + 16);
  if (yMax - yMin < 1e-12) {
    yMax += 0.5;
    yMin -= 0.5;
  }
  const step = niceStep(yMax - yMin, 4);
  const lo = Math.floor(yMin / step) * step;
  const hi = Math.ceil(yMax / step) * step;
  const sx = (e) => left + ((e - 1) / Math.max(1, xMax - 1)) * (right - left);
  const sy = (v) => bottom - ((v - lo) / (hi - lo)) * (bottom - top);
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (let v = lo; v <= hi + step / 2; v += step) {
    ctx.strokeStyle = COLORS.grid;
    ctx.beginPath();
    ctx.moveTo(left, sy(v));
    ctx.lineTo(right, sy(v));
    ctx.stroke();
    ctx.fillStyle = COLORS.axis;
    ctx.textAlign = "right";
    ctx.fillText(fmt(v), left - 6, sy(v) + 4);
  }
  const xStep = Math.max(1, Math.ceil(niceStep(xMax, 6)));
  ctx.textAlign = "center";
  for (let e = 1; e <= xMax; e += e === 1 && xStep > 1 ? xStep - 1 : xStep) {
    ctx.fillText(String(e), sx(e), bottom + 15);
  }
  ctx.fillText("epoch", (left + right) / 2, bottom + 29);
  ctx.strokeStyle = COLORS.axis;
  ctx.beginPath();
  ctx.moveTo(left, top);
  ctx.lineTo(left, bottom);
  ctx.lineTo(right, bottom);
  ctx.stroke();
  for (const s of series) {
    if (!s.points.length) continue;
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 2.5;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    s.points.forEach(([e, v], i) => (i ? ctx.lineTo(sx(e), sy(v)) : ctx.moveTo(sx(e), sy(v))));
    ctx.stroke();
    ctx.setLineDash([]);
    for (const [e, v] of s.points) {
      ctx.beginPath();
      ctx.arc(sx(e), sy(v), 4, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  // legend
  let lx = right;
  ctx.font = "12px system-ui, sans-serif";
  ctx.textAlign = "right";
  for (const s of [...series].reverse()) {
    ctx.fillStyle = "#24292f";
    ctx.fillText(s.label, lx, y + 16);
    lx -= ctx.measureText(s.label).width + 6;
    ctx.fillStyle = s.color;
    ctx.fillRect(lx - 14, y + 9, 14, 4);
    lx -= 26;
  }
}

/**
 * Draw a training status (get_training_status) on a canvas.
 * @param {HTMLCanvasElement} canvas
 * @param {object} status - train_losses, test_losses, test_metrics, total_epochs
 */
export function drawTrainingChart(canvas, status) {
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth || 720;
  const cssH = canvas.clientHeight || 260;
  canvas.width = Math.round(cssW * dpr);
  canvas.height = Math.round(cssH * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, cssW, cssH);
  const train = points(status.train_losses);
  const test = points(status.test_losses);
  const f1 = points((status.test_metrics || []).map((m) => (m ? m.f1 : null)));
  const xMax = Math.max(2, status.total_epochs || 0, train.length, test.length);
  const losses = [...train, ...test].map(([, v]) => v);
  const half = cssW / 2;
  drawPanel(ctx, { x: 0, y: 0, w: half, h: cssH }, {
    title: "Loss",
    series: [
      { label: "train", color: COLORS.train, points: train },
      { label: "test", color: COLORS.test, points: test, dash: [6, 4] },
    ],
    xMax,
    yMin: losses.length ? Math.min(...losses) : 0,
    yMax: losses.length ? Math.max(...losses) : 1,
  });
  // The starting model's AP@0.5 (scored before epoch 1) as a reference line,
  // the fine-tuned model's as a point at the last epoch.
  const base = status.base_instance_metrics ? status.base_instance_metrics.ap_0_5 : null;
  const final = status.instance_metrics ? status.instance_metrics.ap_0_5 : null;
  const f1Series = [{ label: "F1", color: COLORS.f1, points: f1 }];
  if (Number.isFinite(base)) {
    f1Series.push({
      label: `AP@0.5 base ${base.toFixed(2)}`,
      color: COLORS.base,
      points: [[1, base], [xMax, base]],
      dash: [2, 4],
    });
  }
  if (Number.isFinite(final)) {
    f1Series.push({
      label: `AP@0.5 ${final.toFixed(2)}`,
      color: COLORS.final,
      points: [[Math.max(1, train.length), final]],
    });
  }
  drawPanel(ctx, { x: half, y: 0, w: half, h: cssH }, {
    title: "Test F1 (foreground pixels), AP@0.5",
    series: f1Series,
    xMax,
    yMin: 0,
    yMax: 1,
  });
  if (!train.length) {
    ctx.fillStyle = COLORS.axis;
    ctx.font = "13px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.fillText("waiting for the first epoch…", cssW / 4, cssH / 2);
  }
  canvas.dataset.trainPoints = String(train.length);
  canvas.dataset.testPoints = String(test.length);
  canvas.dataset.f1Points = String(f1.length);
  canvas.dataset.baseAp = Number.isFinite(base) ? String(base) : "";
}
