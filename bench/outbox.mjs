#!/usr/bin/env node
// Outbox benchmark (issue 3), all in one run on this machine:
//   1. healthy-sink throughput with the SQLite outbox vs `store: none` (interleaved rounds,
//      median req/s; target: within 10%)
//   2. drain rate of a backlog of BENCH_BACKLOG (20 000) notifications queued while the broker
//      was down, from broker start to the last one at a subscriber (target >= 10 000/s)
//   3. peak RSS of the relay while its broker is down for BENCH_OUTAGE_SECONDS (60) under
//      BENCH_RATE (2 000) posts/s (target: flat, under 150 MB)
// Every server binds 127.0.0.1 on a free port; every loop is bounded; children die at exit.
//
// Env: BENCH_SECONDS (5), BENCH_ROUNDS (3), BENCH_BACKLOG (20000), BENCH_OUTAGE_SECONDS (60),
//      BENCH_RATE (2000). Needs wrk and mosquitto (Debian packages).
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, scratch } from './lib.mjs';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const env = (k, d) => Number(process.env[k] ?? d);
const SECONDS = env('BENCH_SECONDS', 5);
const ROUNDS = env('BENCH_ROUNDS', 3);
const BACKLOG = env('BENCH_BACKLOG', 20_000);
const OUTAGE = env('BENCH_OUTAGE_SECONDS', 60);
const RATE = env('BENCH_RATE', 2000);
const PAYLOAD_FILE = resolve(ROOT, 'test/fixtures/payloads/01-channel-post-full.json');
const PAYLOAD = JSON.parse(readFileSync(PAYLOAD_FILE, 'utf8'));

for (const bin of ['/usr/bin/wrk', '/usr/sbin/mosquitto', '/usr/bin/mosquitto_sub']) {
  if (!existsSync(bin)) {
    console.error(`missing ${bin}: apt-get install -y wrk mosquitto mosquitto-clients`);
    process.exit(1);
  }
}
if (!existsSync(join(ROOT, 'dist/src/cli.js'))) {
  console.error('build first: npm run build');
  process.exit(1);
}

const { dir: tmp, children } = scratch('push-relay-bench-');

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];


function child(cmd, args, opts = {}) {
  const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  children.add(p);
  p.on('exit', () => children.delete(p));
  return p;
}

async function stopChild(p, signal = 'SIGTERM') {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const done = new Promise((r) => p.once('exit', r));
  p.kill(signal);
  await Promise.race([done, sleep(5000).then(() => p.kill('SIGKILL'))]);
}

async function waitHttp(url, ms = 15_000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    try {
      if ((await fetch(url)).ok) return;
    } catch {}
    await sleep(50);
  }
  throw new Error(`no answer from ${url}`);
}

async function startBroker(port) {
  const conf = join(tmp, `mosquitto-${port}.conf`);
  writeFileSync(conf, `listener ${port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 0\n`);
  const p = child('/usr/sbin/mosquitto', ['-c', conf]);
  await sleep(300);
  return p;
}

/** mosquitto_sub counting lines; resolves `count()`. */
function counter(port) {
  const p = child('/usr/bin/mosquitto_sub', ['-h', '127.0.0.1', '-p', String(port), '-q', '1', '-t', 'mm/#', '-i', `bench-${port}`, '-c']);
  let n = 0;
  p.stdout.on('data', (b) => {
    for (const c of b) if (c === 10) n++;
  });
  return { count: () => n, proc: p };
}

async function startRelay(brokerPort, store, extraEnv = {}) {
  const port = await freePort();
  const dataDir = mkdtempSync(join(tmp, 'data-'));
  // Through its shebang, as npm start and the bin run it (with the relay's V8 flags).
  const p = child(join(ROOT, 'dist/src/cli.js'), ['serve'], {
    cwd: ROOT,
    env: {
      ...process.env,
      PUSH_RELAY_HOST: '127.0.0.1',
      PUSH_RELAY_PORT: String(port),
      PUSH_RELAY_MQTT_URL: `mqtt://127.0.0.1:${brokerPort}`,
      PUSH_RELAY_LOG_LEVEL: 'warn',
      PUSH_RELAY_LOG_FORMAT: 'json',
      PUSH_RELAY_STORE: store,
      PUSH_RELAY_DATA_DIR: dataDir,
      ...extraEnv,
    },
  });
  const url = `http://127.0.0.1:${port}`;
  await waitHttp(`${url}/healthz`);
  return { p, url };
}

let wrkRun = 0;
/** wrk with bench/post.lua: the realistic payload, a fresh ack_id per request (else dedup answers). */
function wrk(url, seconds) {
  return new Promise((res, rej) => {
    const p = child('/usr/bin/wrk', ['-t2', '-c16', `-d${seconds}s`, '-s', join(ROOT, 'bench/post.lua'), `${url}/api/v1/send_push`], {
      env: { ...process.env, BENCH_PAYLOAD: PAYLOAD_FILE, BENCH_RUN: String(process.pid % 1000 * 100 + wrkRun++) },
    });
    let out = '';
    p.stdout.on('data', (b) => (out += b));
    p.stderr.on('data', (b) => (out += b));
    p.on('exit', () => {
      const m = /Requests\/sec:\s+([\d.]+)/.exec(out);
      if (!m) return rej(new Error(`wrk: ${out}`));
      const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(out);
      res({ rps: Number(m[1]), non2xx: non2xx ? Number(non2xx[1]) : 0 });
    });
  });
}

function rssMb(pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

const agent = new Agent({ keepAlive: true, maxSockets: 64 });
function postOne(url, body) {
  return new Promise((res) => {
    const req = request(`${url}/api/v1/send_push`, { method: 'POST', agent, headers: { 'User-Agent': 'Mattermost-Bot/1.1', 'Content-Length': Buffer.byteLength(body) } }, (r) => {
      let t = '';
      r.on('data', (c) => (t += c));
      r.on('end', () => res(t.includes('"OK"')));
    });
    req.on('error', () => res(false));
    req.end(body);
  });
}
let ackSeq = 0;
const nextBody = () => JSON.stringify({ ...PAYLOAD, ack_id: `bench${ackSeq++}` });

// ---------------------------------------------------------------- 1. healthy throughput
const brokerPort = await freePort();
let broker = await startBroker(brokerPort);
console.log(`1. healthy sink: ${ROUNDS} interleaved rounds of ${SECONDS}s, wrk -c16, QoS 1 to mosquitto`);
const results = { none: [], sqlite: [] };
for (let r = 0; r < ROUNDS; r++) {
  for (const store of ['none', 'sqlite']) {
    const relay = await startRelay(brokerPort, store);
    await wrk(relay.url, 1);
    const { rps, non2xx } = await wrk(relay.url, SECONDS);
    results[store].push(rps);
    console.log(`   round ${r + 1} store=${store.padEnd(6)} ${rps.toFixed(0)} req/s${non2xx ? ` (${non2xx} non-2xx)` : ''}`);
    await stopChild(relay.p);
  }
}
const ratio = median(results.sqlite) / median(results.none);
console.log(`   median: none ${median(results.none).toFixed(0)} req/s, sqlite outbox ${median(results.sqlite).toFixed(0)} req/s, ratio ${ratio.toFixed(3)} (target >= 0.90: ${ratio >= 0.9 ? 'PASS' : 'MISS'})`);

// ---------------------------------------------------------------- 2. drain rate
console.log(`2. drain: ${BACKLOG} notifications queued with the broker down, then the broker starts`);
await stopChild(broker);
{
  const relay = await startRelay(brokerPort, 'sqlite');
  let ok = 0;
  const lanes = 32;
  await Promise.all(
    Array.from({ length: lanes }, async (_, lane) => {
      for (let i = lane; i < BACKLOG; i += lanes) if (await postOne(relay.url, nextBody())) ok++;
    }),
  );
  broker = await startBroker(brokerPort);
  const sub = counter(brokerPort);
  await sleep(200);
  // The subscriber connects first (the relay reconnects with backoff), then we time the drain.
  const started = Date.now();
  const end = started + 120_000;
  let first = 0;
  while (sub.count() < ok && Date.now() < end) {
    if (!first && sub.count() > 0) first = Date.now();
    await sleep(5);
  }
  const got = sub.count();
  const secs = (Date.now() - (first || started)) / 1000;
  console.log(`   ${ok} answered OK, ${got} arrived; ${(got / secs).toFixed(0)}/s from the first to the last (${secs.toFixed(2)} s; target >= 10000/s: ${got / secs >= 10_000 ? 'PASS' : 'MISS'})${got < ok ? ' LOSS!' : ''}`);
  console.log(`   the first arrived ${first ? ((first - started) / 1000).toFixed(2) : '-'} s after the broker started (the relay's reconnect backoff)`);
  await stopChild(sub.proc);
  await stopChild(relay.p);
}

// ---------------------------------------------------------------- 3. RSS during an outage
console.log(`3. outage: broker down for ${OUTAGE}s under ${RATE} posts/s; relay RSS sampled every 500 ms`);
{
  const relay = await startRelay(brokerPort, 'sqlite');
  for (let i = 0; i < 2000; i++) await postOne(relay.url, nextBody());
  const before = rssMb(relay.p.pid);
  await stopChild(broker);
  const samples = [];
  let ok = 0;
  let sent = 0;
  const t0 = Date.now();
  const heap = [];
  const sampler = setInterval(() => {
    samples.push(rssMb(relay.p.pid));
    fetch(`${relay.url}/metrics`)
      .then((r) => r.text())
      .then((t) => heap.push(Number(/^push_relay_nodejs_heap_size_used_bytes (\S+)/m.exec(t)?.[1] ?? NaN) / 1048576))
      .catch(() => {});
  }, 500);
  const pending = new Set();
  while (Date.now() - t0 < OUTAGE * 1000) {
    const due = Math.floor(((Date.now() - t0) / 1000) * RATE);
    while (sent < due && pending.size < 2000) {
      const pr = postOne(relay.url, nextBody()).then((r) => {
        if (r) ok++;
        pending.delete(pr);
      });
      pending.add(pr);
      sent++;
    }
    await sleep(2);
  }
  await Promise.all(pending);
  clearInterval(sampler);
  const peak = Math.max(...samples);
  const firstHalf = Math.max(...samples.slice(0, samples.length / 2));
  const achieved = sent / OUTAGE;
  console.log(`   ${sent} posted (${achieved.toFixed(0)}/s), ${ok} answered OK; RSS before ${before.toFixed(0)} MB, peak ${peak.toFixed(0)} MB (first half ${firstHalf.toFixed(0)} MB, last ${samples.at(-1).toFixed(0)} MB; target < 150 MB: ${peak < 150 ? 'PASS' : 'MISS'})`);
  const tenths = [0.1, 0.3, 0.5, 0.7, 0.9].map((f) => samples[Math.floor(f * (samples.length - 1))].toFixed(0));
  console.log(`   RSS over the outage (10/30/50/70/90%): ${tenths.join(' / ')} MB; V8 heap used: max ${Math.max(...heap.filter(Number.isFinite)).toFixed(0)} MB, last ${heap.at(-1)?.toFixed(0)} MB`);
  broker = await startBroker(brokerPort);
  const sub = counter(brokerPort);
  const end = Date.now() + 60_000;
  while (sub.count() < ok && Date.now() < end) await sleep(50);
  console.log(`   after the broker came back: ${sub.count()} of ${ok} arrived${sub.count() < ok ? ' LOSS!' : ''}`);
  await stopChild(relay.p);
}
await stopChild(broker);
process.exit(0);
