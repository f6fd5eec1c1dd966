// The two uPlot charts: throughput (payments/s) and latency p50/p99 (ms).
// At most MAX_POINTS one-second points are ever kept.

import { decimal } from './format.js';

export const MAX_POINTS = 120;
const HEIGHT = 160;

const COLORS = {
  throughput: '#2563eb',
  throughputFill: 'rgba(37, 99, 235, 0.12)',
  p50: '#0f766e',
  p99: '#c2410c',
  axis: '#5b6472',
  grid: 'rgba(15, 23, 42, 0.07)',
};

function axes(unitLabel) {
  const common = {
    stroke: COLORS.axis,
    grid: { stroke: COLORS.grid, width: 1 },
    ticks: { stroke: COLORS.grid, width: 1 },
    font: '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif',
  };
  return [
    { ...common, space: 60 },
    { ...common, size: 46, label: unitLabel, labelSize: 14, labelFont: common.font,
      values: (u, splits) => splits.map((v) => (v == null ? '' : formatTick(v))) },
  ];
}

function formatTick(v) {
  if (Math.abs(v) >= 1000) return `${Math.round(v / 100) / 10}k`;
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

/** y from 0 to a little above the largest value (at least `floor`). */
function zeroBased(floor) {
  return (u, min, max) => [0, Math.max(floor, (max ?? 0) * 1.15)];
}

/** x always spans the last MAX_POINTS seconds, ending at the newest point. */
function lastTwoMinutes(u, min, max) {
  const end = Number.isFinite(max) ? max : Math.floor(Date.now() / 1000);
  return [end - (MAX_POINTS - 1), end];
}

function widthOf(el) {
  return Math.max(200, Math.floor(el.clientWidth || el.getBoundingClientRect().width || 300));
}

class Chart {
  constructor(container, series, unitLabel, floor) {
    this.container = container;
    this.data = [[], ...series.map(() => [])];
    const opts = {
      width: widthOf(container),
      height: HEIGHT,
      pxAlign: 0,
      cursor: { drag: { x: false, y: false, setScale: false }, points: { size: 6 } },
      legend: { show: true, live: true },
      scales: { x: { time: true, range: lastTwoMinutes }, y: { range: zeroBased(floor) } },
      axes: axes(unitLabel),
      series: [{
        label: 'time',
        // Not hovering: the legend shows the newest values.
        value: (u, v, sidx, idx) => (idx == null ? 'latest' : v == null ? '–' : new Date(v * 1000).toLocaleTimeString()),
      }, ...series],
    };
    this.plot = new window.uPlot(opts, this.data, container);
    this.lastWidth = opts.width;
    let frame = 0;
    // Resize on the next frame, and only for width changes: no ResizeObserver loops.
    this.observer = new ResizeObserver(() => {
      cancelAnimationFrame(frame);
      frame = requestAnimationFrame(() => {
        const width = widthOf(container);
        if (width !== this.lastWidth) {
          this.lastWidth = width;
          this.plot.setSize({ width, height: HEIGHT });
        }
      });
    });
    this.observer.observe(container);
  }

  setData(data) {
    this.data = data;
    this.plot.setData(data);
    if (this.plot.legend.idx == null) this.plot.setLegend({ idx: null });
  }
}

/** Legend values; when not hovering (idx null) the newest second's value. */
function valueFormatter(unit) {
  return (u, v, sidx, idx) => {
    const values = u.data[sidx] || [];
    const value = idx == null ? values[values.length - 1] : v;
    return value == null ? '–' : `${decimal(value)} ${unit}`;
  };
}

/** Creates both charts; returns an object to feed them. */
export function createCharts(throughputEl, latencyEl) {
  if (typeof window.uPlot !== 'function') {
    throughputEl.textContent = 'Charts unavailable: uPlot did not load.';
    latencyEl.textContent = 'Charts unavailable: uPlot did not load.';
    return { setLive() {}, push() {}, clearLatency() {} };
  }
  const throughput = new Chart(throughputEl, [{
    label: 'payments/s',
    stroke: COLORS.throughput,
    fill: COLORS.throughputFill,
    width: 1.5,
    points: { show: false },
    value: valueFormatter('/s'),
  }], 'per s', 5);
  const latency = new Chart(latencyEl, [
    { label: 'p50', stroke: COLORS.p50, width: 1.5, points: { show: false }, spanGaps: false, value: valueFormatter('ms') },
    { label: 'p99', stroke: COLORS.p99, width: 1.5, points: { show: false }, spanGaps: false, value: valueFormatter('ms') },
  ], 'ms', 10);

  // Points as [{at (ms), count, p50_ms, p99_ms}], oldest first.
  let points = [];

  function render() {
    const xs = points.map((p) => Math.floor(p.at / 1000));
    throughput.setData([xs, points.map((p) => p.count)]);
    latency.setData([
      xs,
      points.map((p) => (p.p50_ms ?? null)),
      points.map((p) => (p.p99_ms ?? null)),
    ]);
  }

  return {
    /** Replaces every point with the server's live buckets. */
    setLive(live) {
      if (!Array.isArray(live)) return;
      points = live.slice(-MAX_POINTS).map((p) => ({
        at: p.at,
        count: p.count ?? 0,
        p50_ms: p.count ? p.p50_ms ?? null : null,
        p99_ms: p.count ? p.p99_ms ?? null : null,
      }));
      render();
    },
    /** Appends one derived point (polling mode); keeps at most MAX_POINTS. */
    push(point) {
      const last = points[points.length - 1];
      if (last && Math.floor(last.at / 1000) >= Math.floor(point.at / 1000)) return;
      points.push(point);
      if (points.length > MAX_POINTS) points.splice(0, points.length - MAX_POINTS);
      render();
    },
    get size() {
      return points.length;
    },
  };
}
