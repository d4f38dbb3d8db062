// apiary monitor: swaps in the server-rendered sections and redraws each run's chart, every refresh.
(function () {
  "use strict";
  const refresh = 1000 * parseFloat(document.body.dataset.refresh || "5");
  const live = document.getElementById("live");
  window.apiaryPlots = {};

  function plot(runs) {
    for (const run of runs) {
      const box = document.querySelector('.plot[data-run="' + CSS.escape(run.run) + '"]');
      if (!box || typeof uPlot === "undefined") continue;
      const points = run.history;
      const data = [points.map(p => p.time), points.map(p => p.samples_per_second), points.map(p => p.loss)];
      const chart = new uPlot({
        width: Math.max(320, box.clientWidth), height: 200,
        series: [{}, {label: "samples/s", stroke: "#1f8a5b", width: 2, scale: "sps"},
                 {label: "loss", stroke: "#c4532b", width: 2, scale: "loss"}],
        axes: [{}, {scale: "sps", label: "samples/s"}, {scale: "loss", side: 1, label: "loss", grid: {show: false}}],
      }, data, box);
      box.dataset.points = String(points.length);
      window.apiaryPlots[run.run] = {samples_per_second: data[1], loss: data[2], chart: chart};
    }
  }

  async function update() {
    try {
      const [sections, runs] = await Promise.all([
        fetch("sections", {cache: "no-store"}).then(r => r.text()),
        fetch("api/runs", {cache: "no-store"}).then(r => r.json()),
      ]);
      live.innerHTML = sections;
      plot(runs.runs || []);
      document.body.dataset.updates = String(1 + parseInt(document.body.dataset.updates || "0", 10));
      delete document.body.dataset.error;
    } catch (error) {
      document.body.dataset.error = String(error);
    }
    setTimeout(update, refresh);
  }
  update();
})();
