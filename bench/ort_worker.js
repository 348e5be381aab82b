// ONNX Runtime worker for bench/compare.py: runs one .onnx model with random input and prints
// {"ms_per_image_median": ...} on stdout. Uses onnxruntime-node (its bundled native
// libonnxruntime), CPU execution provider, sequential execution, intra-op threads as asked.
//   node bench/ort_worker.js MODEL.onnx BATCH THREADS ITERATIONS IMAGE_SIZE
// NODE_PATH (or a bench/node_modules) must let require('onnxruntime-node') resolve.
const ort = require('onnxruntime-node');

async function main() {
  const [model, batch, threads, iterations, size] = process.argv.slice(2);
  const B = Number(batch), T = Number(threads), N = Number(iterations), S = Number(size);
  const session = await ort.InferenceSession.create(model, {
    executionProviders: ['cpu'],
    executionMode: 'sequential',
    graphOptimizationLevel: 'all',
    intraOpNumThreads: T,
    interOpNumThreads: 1,
  });
  const data = new Float32Array(B * 3 * S * S);
  let seed = 3;  // a small LCG: the values do not matter, only that they are not all zero
  for (let i = 0; i < data.length; ++i) {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    data[i] = seed / 1073741824 - 1;
  }
  const feeds = {[session.inputNames[0]]: new ort.Tensor('float32', data, [B, 3, S, S])};
  const times = [];
  for (let i = 0; i < N + 2; ++i) {  // two warm-up runs
    const t0 = process.hrtime.bigint();
    await session.run(feeds);
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    if (i >= 2) times.push(ms / B);
  }
  times.sort((a, b) => a - b);
  const n = times.length;
  const median = n % 2 ? times[(n - 1) / 2] : (times[n / 2 - 1] + times[n / 2]) / 2;
  console.log(JSON.stringify({ms_per_image_median: median, onnxruntime: require('onnxruntime-node/package.json').version}));
}

main().catch((e) => { console.error(String(e)); process.exit(1); });
