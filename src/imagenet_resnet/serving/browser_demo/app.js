// The Static Space's page: the model runs in the visitor's browser with ONNX Runtime Web (WebAssembly), from the
// files beside this one; nothing is uploaded and nothing is loaded from another host.
//
// An image goes through what `imagenet-resnet predict` does (docs/serving.md, "The ONNX model's contract"): EXIF
// orientation applied, transparency composited onto white, grey turned into RGB, the centre square of
// crop_ratio x the short side widened to whole pixels, resized to size x size with PyTorch's antialiased bilinear
// filter in its fixed point (width first, rounded to 8 bits after each pass), then normalised. The one difference:
// `predict` decodes a large JPEG at a reduced DCT scale (libjpeg's), the browser at full size; the export measures
// what that changes (docs/serving.md, "A demo anyone can host").

const RUNTIME = 'vendor/onnxruntime-web/';
const $ = (id) => document.getElementById(id);
const statusLine = $('status');
let meta = null;
let session = null;
let ort = null;
let shown = null; // the last answer: {probabilities, maps, mapSize, size, top}
let queue = Promise.resolve(); // one image at a time, in the order asked
const startedAt = performance.now();

function say(text, state = 'ready') {
  statusLine.textContent = text;
  statusLine.classList.toggle('error', state === 'error');
  document.body.dataset.state = state;
}

class Refusal extends Error {} // a message for the visitor, said as it is

function megabytes(bytes) {
  return `${(bytes / 1e6).toFixed(1)} MB`;
}

async function start() {
  say('Loading the page…', 'loading');
  if (typeof WebAssembly !== 'object' || typeof WebAssembly.instantiate !== 'function') {
    say('This browser cannot run WebAssembly, which the model needs: open the page in a current Chrome, Edge, ' +
        'Firefox or Safari, or turn WebAssembly on.', 'error');
    return;
  }
  try {
    const response = await fetch('model.json');
    if (!response.ok) throw new Error(`model.json: HTTP ${response.status}`);
    meta = await response.json();
  } catch (error) {
    say(`The page's model.json could not be read (${error.message}): reload the page.`, 'error');
    return;
  }
  showCard();
  showExamples();
  listenForImages();
  try {
    const runtime = import(`./${RUNTIME}ort.wasm.bundle.min.mjs`);
    const model = download(meta.model.file, meta.model.bytes);
    ort = await runtime;
    // The .wasm alone: a path prefix would make the runtime fetch the glue module its bundle already holds.
    ort.env.wasm.wasmPaths = { wasm: new URL(`${RUNTIME}ort-wasm-simd-threaded.wasm`, location.href).href };
    // Threads need a cross-origin isolated page (the Space's custom_headers); elsewhere one thread.
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    // disable_quant_qdq: int8 weights are then dequantized once, as the session starts (constant folding),
    // instead of at every image (ONNX Runtime keeps DequantizeLinear for quantized kernels the graph does not use).
    session = await ort.InferenceSession.create(await model, { executionProviders: ['wasm'],
                                                               extra: { session: { disable_quant_qdq: '1' } } });
  } catch (error) {
    say(`The model could not be loaded (${error.message || error}): reload the page; on a phone short of memory, ` +
        'ask for the export with smaller weights (--precision int8).', 'error');
    return;
  }
  $('progress').hidden = true;
  say('Ready: drop an image, choose a file, or click an example.');
  const asked = new URLSearchParams(location.search).get('image');
  if (asked) classifyUrl(asked, true);
}

async function download(file, bytes) {
  const response = await fetch(file);
  if (!response.ok) throw new Error(`${file}: HTTP ${response.status}`);
  const progress = $('progress');
  progress.hidden = false;
  progress.max = bytes;
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    progress.value = received;
    say(`Downloading the model: ${megabytes(received)} of ${megabytes(bytes)} (once; the browser keeps it)`, 'loading');
  }
  const whole = new Uint8Array(received);
  let offset = 0;
  for (const chunk of chunks) {
    whole.set(chunk, offset);
    offset += chunk.length;
  }
  say('Starting the model…', 'loading');
  return whole;
}

function listenForImages() {
  const drop = $('drop');
  $('file').addEventListener('change', (event) => {
    const file = event.target.files[0];
    if (file) classifyBlob(file, file.name, null);
    event.target.value = ''; // the same file chosen again is a new request
  });
  for (const name of ['dragenter', 'dragover']) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add('over');
    });
  }
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('over');
    const file = event.dataTransfer.files[0];
    const link = event.dataTransfer.getData('text/uri-list').split('\n').find((line) => line && !line.startsWith('#'));
    if (file) classifyBlob(file, file.name, null);
    else if (link) classifyUrl(link.trim(), true);
    else say('Nothing to classify was dropped: drop an image file.', 'error');
  });
}

function showExamples() {
  const box = $('examples');
  for (const name of meta.examples) {
    const button = document.createElement('button');
    button.type = 'button';
    button.title = `classify ${name}`;
    const image = document.createElement('img');
    image.src = `examples/${encodeURIComponent(name)}`;
    image.alt = `example: ${name}`;
    image.loading = 'lazy';
    button.append(image);
    button.addEventListener('click', () => classifyUrl(`examples/${encodeURIComponent(name)}`, true));
    box.append(button);
  }
}

function showCard() {
  const card = meta.card;
  $('title').textContent = `${card.architecture} classifier`;
  document.title = $('title').textContent;
  const share = (value) => (value === null || value === undefined ? 'not recorded' : `${(value * 100).toFixed(1)}%`);
  const agreement = meta.parity_with_pytorch.images;
  const fields = [
    ['classes', String(card.num_classes)],
    ['validation accuracy', `top-1 ${share(card.val_top1)}, top-5 ${share(card.val_top5)}` +
      (card.val_images ? ` on ${card.val_images.toLocaleString('en')} images` : '')],
    ['weights', `${card.weights || 'raw'}, stored as ${meta.model.weights_stored_as} (${megabytes(meta.model.bytes)})`],
    ['agreement with PyTorch', `top-1 ${share(agreement.top1_agreement)} on the export's ${agreement.images} check ` +
      `images, logits within ${agreement.max_abs_diff}`],
    ['epochs', card.epochs_trained === null || card.epochs_trained === undefined ? '?' : String(card.epochs_trained)],
    ['limitations', card.limitations || 'not recorded'],
  ];
  const list = $('card-fields');
  for (const [name, value] of fields) {
    const term = document.createElement('dt');
    term.textContent = name;
    const detail = document.createElement('dd');
    detail.textContent = value;
    list.append(term, detail);
  }
}

function classifyUrl(address, share) {
  let url;
  try {
    url = new URL(address, location.href);
  } catch {
    say(`"${address}" is not a link to an image: give an http(s) address.`, 'error');
    return;
  }
  if (!['http:', 'https:', 'data:', 'blob:'].includes(url.protocol)) {
    say(`${url.protocol} links cannot be read: give an http(s) address.`, 'error');
    return;
  }
  const label = url.protocol === 'data:' ? 'the image in the link' : decodeURIComponent(url.pathname.split('/').pop() || url.href);
  enqueue(async () => {
    let response;
    try {
      response = await fetch(url);
    } catch {
      throw new Refusal(`${url.href} could not be fetched: its site may not let other pages read its images ` +
                        '(CORS). Download the image and drop it here.');
    }
    if (!response.ok) throw new Refusal(`${url.href}: the server answered HTTP ${response.status}.`);
    const size = Number(response.headers.get('content-length'));
    if (size > meta.limits.max_bytes) throw tooLarge(label, size);
    return classify(await response.blob(), label, share ? address : null);
  });
}

function classifyBlob(blob, label, share) {
  enqueue(() => classify(blob, label, share));
}

function enqueue(work) {
  queue = queue.then(async () => {
    if (!session) {
      if (document.body.dataset.state === 'error') return;
      say('The image will be classified once the model has loaded…', 'loading');
      while (!session && document.body.dataset.state !== 'error') await new Promise((done) => setTimeout(done, 100));
      if (!session) return;
    }
    try {
      await work();
    } catch (error) {
      say(error instanceof Refusal ? error.message : `Something went wrong: ${error.message || error}`, 'error');
    }
  });
}

function tooLarge(label, bytes) {
  return new Refusal(`${label} is ${(bytes / 2 ** 20).toFixed(1)} MiB, over the ${meta.limits.max_bytes / 2 ** 20} MiB ` +
                     'limit: use a smaller image.');
}

async function classify(blob, label, share) {
  if (blob.size === 0) throw new Refusal(`${label} is empty (0 bytes): not an image.`);
  if (blob.size > meta.limits.max_bytes) throw tooLarge(label, blob.size);
  say(`Classifying ${label}…`, 'busy');
  const began = performance.now();
  let bitmap;
  try {
    // As stored values, as predict reads them: no colour-profile conversion; upright as EXIF says.
    bitmap = await createImageBitmap(blob, { imageOrientation: 'from-image', premultiplyAlpha: 'none',
                                             colorSpaceConversion: 'none' });
  } catch {
    throw new Refusal(`${label} is not an image this browser can read: choose a JPEG, PNG, WebP, GIF or BMP file.`);
  }
  const megapixels = (bitmap.width * bitmap.height) / 1e6;
  if (bitmap.width * bitmap.height > meta.limits.max_pixels) {
    bitmap.close();
    throw new Refusal(`${label} has ${megapixels.toFixed(1)} megapixels, over the ${meta.limits.max_pixels / 1e6} ` +
                      'megapixel limit: use a smaller image.');
  }
  const head = new Uint8Array(await blob.slice(0, 65536).arrayBuffer()); // where a JPEG's EXIF block is
  const pixels = preprocess(bitmap, meta.preprocessing, isStoredJpeg(head));
  bitmap.close();
  const size = meta.preprocessing.size;
  const input = new ort.Tensor('float32', normalise(pixels, meta.preprocessing), [1, 3, size, size]);
  const ran = performance.now();
  const outputs = await session.run({ images: input });
  const answered = performance.now();
  const logits = outputs.logits.data;
  const [, , mapHeight, mapWidth] = outputs.class_maps.dims;
  shown = { probabilities: softmax(logits), maps: outputs.class_maps.data, mapSize: [mapHeight, mapWidth], size };
  drawPicture(pixels, size);
  showTop5();
  showMap(shown.top[0]);
  if (share !== undefined) history.replaceState(null, '', share ? `?image=${encodeURIComponent(share).replaceAll('%2F', '/')}` : location.pathname);
  if (!document.body.dataset.firstAnswerMs) document.body.dataset.firstAnswerMs = (answered - startedAt).toFixed(0);
  say(`${label}: answered in ${(answered - began).toFixed(0)} ms (the model ${(answered - ran).toFixed(0)} ms), ` +
      'in this browser.', 'answered');
}

// The centre crop as predict makes it: size x size x 3 RGB bytes. `storedJpeg`: a JPEG predict decodes as stored
// (no EXIF rotation), which it decodes at 1/2, 1/4 or 1/8 of its size where the crop stays at least size x size
// (libjpeg's DCT scaling); the browser decodes at full size only, so the page averages each factor x factor block
// instead, which comes within a fraction of a level of libjpeg's scaled pixels (docs/serving.md).
function preprocess(bitmap, { size, crop_ratio: cropRatio }, storedJpeg) {
  const width = bitmap.width;
  const height = bitmap.height;
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext('2d', { willReadFrequently: true });
  context.fillStyle = '#fff'; // transparency onto white, as predict composites it
  context.fillRect(0, 0, width, height);
  context.drawImage(bitmap, 0, 0);
  const side = Math.min(width, height) * cropRatio;
  let factor = 1;
  while (storedJpeg && factor < 8 && side / (2 * factor) >= size) factor *= 2;
  // The decoded size and the whole decoded pixels that hold the square, as predict computes them
  const decodedWidth = Math.ceil(width / factor);
  const decodedHeight = Math.ceil(height / factor);
  const sx = decodedWidth / width;
  const sy = decodedHeight / height;
  const x0 = (width - side) / 2;
  const y0 = (height - side) / 2;
  const left = Math.floor(x0 * sx);
  const top = Math.floor(y0 * sy);
  const right = Math.max(left + 1, Math.ceil((x0 + side) * sx));
  const bottom = Math.max(top + 1, Math.ceil((y0 + side) * sy));
  const cropWidth = right - left;
  const cropHeight = bottom - top;
  // The full-size pixels under those decoded ones (a last partial block repeats the image's edge, as JPEG pads it)
  const sourceLeft = left * factor;
  const sourceTop = top * factor;
  const sourceWidth = Math.min(right * factor, width) - sourceLeft;
  const sourceHeight = Math.min(bottom * factor, height) - sourceTop;
  const rgba = context.getImageData(sourceLeft, sourceTop, sourceWidth, sourceHeight).data;
  const block = factor * factor;
  let rgb = new Uint8Array(cropWidth * cropHeight * 3);
  for (let y = 0; y < cropHeight; y++) {
    for (let x = 0; x < cropWidth; x++) {
      for (let c = 0; c < 3; c++) {
        let total = 0;
        for (let dy = 0; dy < factor; dy++) {
          const row = Math.min(y * factor + dy, sourceHeight - 1);
          for (let dx = 0; dx < factor; dx++) {
            total += rgba[(row * sourceWidth + Math.min(x * factor + dx, sourceWidth - 1)) * 4 + c];
          }
        }
        rgb[(y * cropWidth + x) * 3 + c] = Math.floor(total / block + 0.5);
      }
    }
  }
  if (cropWidth !== size) rgb = resizeAxis(rgb, cropWidth, cropHeight, size, true);
  if (cropHeight !== size) rgb = resizeAxis(rgb, size, cropHeight, size, false);
  return rgb;
}

// Whether predict decodes this file as a JPEG as stored: JPEG's signature, and no EXIF orientation other than
// "as stored" (1, or 0 for none) in its APP1 segment; a malformed EXIF block counts as none, as Pillow reads it.
function isStoredJpeg(head) {
  if (head[0] !== 0xff || head[1] !== 0xd8) return false;
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  let at = 2;
  while (at + 4 <= head.length && head[at] === 0xff) {
    const marker = head[at + 1];
    const length = view.getUint16(at + 2);
    if (marker === 0xda || length < 2) break; // the image data begins: no EXIF before it
    const exif = at + 4;
    if (marker === 0xe1 && exif + 14 <= head.length && view.getUint32(exif) === 0x45786966) { // "Exif"
      return [0, 1].includes(exifOrientation(view, exif + 6, Math.min(head.length, at + 2 + length)));
    }
    at += 2 + length;
  }
  return true;
}

function exifOrientation(view, tiff, end) {
  try {
    const little = view.getUint16(tiff) === 0x4949; // "II"
    const ifd = tiff + view.getUint32(tiff + 4, little);
    const entries = view.getUint16(ifd, little);
    for (let k = 0; k < entries; k++) {
      const entry = ifd + 2 + 12 * k;
      if (entry + 12 > end) break;
      if (view.getUint16(entry, little) === 0x0112) return view.getUint16(entry + 8, little);
    }
  } catch {
    // a malformed EXIF block: the pixels are used as stored
  }
  return 1;
}

// PyTorch's antialiased bilinear filter for nIn -> nOut pixels in its fixed point, as docs/serving.md's
// resize_weights(): each output pixel's first input pixel, its taps' integer weights, and their bits.
function resizeWeights(nIn, nOut) {
  const scale = nIn / nOut;
  const [support, stretch] = scale >= 1 ? [scale, 1 / scale] : [1.0, 1.0];
  const starts = new Int32Array(nOut);
  const counts = new Int32Array(nOut);
  const centres = new Float64Array(nOut);
  let taps = 0;
  for (let i = 0; i < nOut; i++) {
    centres[i] = scale * (i + 0.5);
    starts[i] = Math.max(Math.trunc(centres[i] - support + 0.5), 0);
    counts[i] = Math.min(Math.trunc(centres[i] + support + 0.5), nIn) - starts[i];
    taps = Math.max(taps, counts[i]);
  }
  const weights = new Float64Array(nOut * taps);
  let largest = 0;
  for (let i = 0; i < nOut; i++) {
    let total = 0;
    for (let k = 0; k < taps; k++) {
      const w = k < counts[i] ? Math.max(1 - Math.abs((starts[i] + k - centres[i] + 0.5) * stretch), 0) : 0;
      weights[i * taps + k] = w;
      total += w;
    }
    for (let k = 0; k < taps; k++) {
      weights[i * taps + k] /= total;
      largest = Math.max(largest, weights[i * taps + k]);
    }
  }
  let bits = 0;
  while (bits < 22 && Math.floor(0.5 + largest * 2 ** (bits + 1)) < 2 ** 15) bits++;
  const fixed = new Int32Array(nOut * taps);
  for (let n = 0; n < fixed.length; n++) fixed[n] = Math.floor(weights[n] * 2 ** bits + 0.5);
  return { starts, fixed, taps, bits };
}

// One pass of the resize along the width (horizontal) or the height, RGB bytes in and out, rounded to 8 bits.
function resizeAxis(rgb, width, height, size, horizontal) {
  const nIn = horizontal ? width : height;
  const { starts, fixed, taps, bits } = resizeWeights(nIn, size);
  const outWidth = horizontal ? size : width;
  const outHeight = horizontal ? height : size;
  const out = new Uint8Array(outWidth * outHeight * 3);
  const half = 2 ** (bits - 1);
  const unit = 2 ** bits;
  for (let y = 0; y < outHeight; y++) {
    for (let x = 0; x < outWidth; x++) {
      const i = horizontal ? x : y;
      for (let c = 0; c < 3; c++) {
        let total = 0;
        for (let k = 0; k < taps; k++) {
          const source = Math.min(starts[i] + k, nIn - 1);
          const at = horizontal ? (y * width + source) * 3 + c : (source * width + x) * 3 + c;
          total += rgb[at] * fixed[i * taps + k];
        }
        out[(y * outWidth + x) * 3 + c] = Math.min(255, Math.max(0, Math.floor((total + half) / unit)));
      }
    }
  }
  return out;
}

function normalise(rgb, { size, mean, std }) {
  const plane = size * size;
  const data = new Float32Array(3 * plane);
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) data[c * plane + p] = (rgb[p * 3 + c] / 255 - mean[c]) / std[c];
  }
  return data;
}

function softmax(logits) {
  let peak = -Infinity;
  for (const value of logits) peak = Math.max(peak, value);
  const exps = Array.from(logits, (value) => Math.exp(value - peak));
  const total = exps.reduce((sum, value) => sum + value, 0);
  return exps.map((value) => value / total);
}

function drawPicture(rgb, size) {
  const canvas = $('picture');
  canvas.width = size;
  canvas.height = size;
  const image = new ImageData(size, size);
  for (let p = 0, q = 0; p < rgb.length; p += 3, q += 4) {
    image.data[q] = rgb[p];
    image.data[q + 1] = rgb[p + 1];
    image.data[q + 2] = rgb[p + 2];
    image.data[q + 3] = 255;
  }
  canvas.getContext('2d').putImageData(image, 0, 0);
  $('view').hidden = false;
}

function showTop5() {
  const order = shown.probabilities.map((p, k) => [p, k]).sort((a, b) => b[0] - a[0]).slice(0, 5);
  shown.top = order.map(([, k]) => k);
  const list = $('top5');
  list.replaceChildren();
  for (const [probability, k] of order) {
    const item = document.createElement('li');
    item.dataset.classId = meta.classes[k];
    item.dataset.index = String(k);
    item.dataset.probability = String(probability);
    item.title = 'show where the evidence for this class lies';
    item.textContent = `${meta.class_names[k]} ${(probability * 100).toFixed(2)}%`;
    const bar = document.createElement('span');
    bar.className = 'bar';
    bar.style.width = `${(probability * 100).toFixed(1)}%`;
    item.append(bar);
    item.addEventListener('click', () => showMap(k));
    list.append(item);
  }
}

// The class activation map of class k (equal to Grad-CAM at the last block): its ReLU, divided by its peak,
// upsampled bilinearly (align_corners=False, as explain's maps) and drawn in the jet colours over the picture.
function showMap(k) {
  const [h, w] = shown.mapSize;
  const map = Float64Array.from(shown.maps.subarray(k * h * w, (k + 1) * h * w), (v) => Math.max(v, 0));
  const peak = map.reduce((a, b) => Math.max(a, b), 0);
  shown.map = { index: k, values: Array.from(map, (v) => (peak > 0 ? v / peak : 0)) };
  const size = shown.size;
  const canvas = $('heat');
  canvas.width = size;
  canvas.height = size;
  const image = new ImageData(size, size);
  for (let y = 0; y < size; y++) {
    const sy = Math.max((y + 0.5) * (h / size) - 0.5, 0);
    const y0 = Math.min(Math.floor(sy), h - 1);
    const y1 = Math.min(y0 + 1, h - 1);
    const fy = sy - y0;
    for (let x = 0; x < size; x++) {
      const sx = Math.max((x + 0.5) * (w / size) - 0.5, 0);
      const x0 = Math.min(Math.floor(sx), w - 1);
      const x1 = Math.min(x0 + 1, w - 1);
      const fx = sx - x0;
      const v = shown.map.values;
      const value = (1 - fy) * ((1 - fx) * v[y0 * w + x0] + fx * v[y0 * w + x1]) +
                    fy * ((1 - fx) * v[y1 * w + x0] + fx * v[y1 * w + x1]);
      const at = (y * size + x) * 4;
      image.data[at] = jet(value, 3);
      image.data[at + 1] = jet(value, 2);
      image.data[at + 2] = jet(value, 1);
      image.data[at + 3] = 255;
    }
  }
  canvas.getContext('2d').putImageData(image, 0, 0);
  for (const item of $('top5').children) item.classList.toggle('shown', item.dataset.index === String(k));
  $('heat-caption').textContent = peak > 0
    ? `What the model saw (the centre crop); heat: where the evidence for ${meta.class_names[k]} lies ` +
      '(red most, blue none). Click a class to see its map.'
    : `No part of the image counts for ${meta.class_names[k]}: its map is empty.`;
}

// matplotlib's "jet": channel 3 red, 2 green, 1 blue.
function jet(value, channel) {
  return Math.round(255 * Math.min(Math.max(1.5 - Math.abs(4 * value - channel), 0), 1));
}

window.lastAnswer = () => (shown ? { top: shown.top, probabilities: shown.probabilities, map: shown.map, mapSize: shown.mapSize } : null);
start();
