#!/usr/bin/env node
// What the guards cost: the relay with every API guard on (IP allowlist, rate limit at a
// limit the load stays under, basic auth) against the same relay with none, in one run.
//
//   (n) none      push-relay serve, one MQTT sink (QoS 1) on a mosquitto this script starts
//   (g) guarded   the same, plus server.allow [127.0.0.1/32], server.rateLimit 10^6/s, and
//                 server.auth (wrk sends the Authorization header with -H)
//
// Load: wrk -c16 -t2 with bench/post.lua (the realistic payload, a fresh ack_id per request,
// every answer checked to be {"status":"OK"}). Rounds alternate n, g, n, g, ...; each a warm-up
// then a measured run; a target's figure is its median OK answers per second. After each
// round the relay's own count of broker-acknowledged publishes must cover every OK answer.
// Also reported: the relay's CPU time per notification (process_cpu_seconds_total), which
// moves less than OK/s with what else the shared machine runs.
//
// Env: BENCH_SECONDS (5), BENCH_WARMUP (2), BENCH_ROUNDS (3), BENCH_CONNECTIONS (16),
//      BENCH_THREADS (2). Exit 0 when both ran and nothing was lost; the ratio is reported
//      (goal: guarded >= 0.9 x none), not fatal: a loaded machine moves it.
import { spawn } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { cpus, loadavg } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, scratch } from './lib.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, '..');
const HOST = '127.0.0.1';
const num = (name, dflt) => (process.env[name] ? Number(process.env[name]) : dflt);
const SECONDS = num('BENCH_SECONDS', 5);
const WARMUP = num('BENCH_WARMUP', 2);
const ROUNDS = num('BENCH_ROUNDS', 3);
const CONNS = num('BENCH_CONNECTIONS', 16);
const THREADS = num('BENCH_THREADS', 2);
const PAYLOAD = process.env.BENCH_PAYLOAD || join(ROOT, 'test/fixtures/payloads/01-channel-post-full.json');
const AUTH = { username: 'mattermost', password: 'bench-password-0123' };

const { dir: tmp, children } = scratch('push-relay-bench-guards-');
process.on('SIGTERM', () => process.exit(130));
const die = (m) => {
  process.stderr.write(`bench/guards: ${m}\n`);
  process.exit(1);
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

for (const tool of ['/usr/bin/wrk', '/usr/sbin/mosquitto']) if (!existsSync(tool)) die(`missing ${tool}`);
if (!existsSync(join(ROOT, 'dist/src/cli.js'))) die('dist/src/cli.js is missing: build first (npx tsc -p tsconfig.json)');

function start(cmd, args, opts = {}) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  let tail = '';
  const keep = (c) => (tail = (tail + c).slice(-4000));
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  children.add(child);
  child.on('close', () => children.delete(child));
  return { child, tail: () => tail };
}
const open = (port) =>
  new Promise((res) => {
    const s = connect(port, HOST);
    s.once('connect', () => (s.destroy(), res(true)));
    s.once('error', () => res(false));
  });
async function until(probe, ms) {
  for (const deadline = Date.now() + ms; Date.now() < deadline; await sleep(100)) {
    try {
      if (await probe()) return true;
    } catch {}
  }
  return false;
}

async function broker() {
  const port = await freePort();
  const conf = join(tmp, 'mosquitto.conf');
  writeFileSync(conf, [`listener ${port} ${HOST}`, 'allow_anonymous true', 'persistence false', 'max_inflight_messages 0', 'max_queued_messages 1000000', ''].join('\n'));
  start('/usr/sbin/mosquitto', ['-c', conf]);
  if (!(await until(() => open(port), 8000))) die('mosquitto did not start');
  return port;
}

async function relay(name, brokerPort, server) {
  const port = await freePort();
  const file = join(tmp, `${name}.json`);
  writeFileSync(file, JSON.stringify({ server: { host: HOST, port, ...server }, dataDir: join(tmp, `${name}-data`), sinks: { mqtt: { type: 'mqtt', url: `mqtt://${HOST}:${brokerPort}`, topic: 'mm/_notif' } } }));
  // The V8 flag of cli.js's shebang, given here so that a dist/ built by tsc alone (no chmod) runs too.
  const proc = start(process.execPath, ['--max-semi-space-size=8', join(ROOT, 'dist/src/cli.js'), 'serve', '--config', file], { cwd: tmp, env: { ...process.env, PUSH_RELAY_LOG_LEVEL: 'warn', PUSH_RELAY_LOG_FORMAT: 'json' } });
  const url = `http://${HOST}:${port}`;
  if (!(await until(async () => (await fetch(`${url}/readyz`)).ok, 15_000))) die(`relay ${name} did not start:\n${proc.tail()}`);
  return {
    name,
    url,
    headers: server.auth ? ['-H', `Authorization: Basic ${Buffer.from(`${AUTH.username}:${AUTH.password}`).toString('base64')}`] : [],
    /** Broker-acknowledged publishes so far, and the relay's CPU seconds (user + system). */
    async published() {
      const text = await (await fetch(`${url}/metrics`)).text();
      const m = /push_relay_sink_outcomes_total\{sink="mqtt",outcome="delivered",reason=""\} (\d+)/.exec(text);
      const cpu = Number(/^push_relay_process_cpu_seconds_total (\S+)/m.exec(text)?.[1] ?? NaN);
      return { n: Number(m?.[1] ?? 0), cpu };
    },
  };
}

let runs = 0;
async function wrk(target, seconds) {
  const args = [`-c${CONNS}`, `-t${THREADS}`, `-d${seconds}s`, '--timeout', '5s', ...target.headers, '-s', join(HERE, 'post.lua'), `${target.url}/api/v1/send_push`];
  let out = '';
  const p = spawn('/usr/bin/wrk', args, { env: { ...process.env, BENCH_PAYLOAD: PAYLOAD, BENCH_RUN: String(++runs) } });
  children.add(p);
  p.stdout.on('data', (c) => (out += c));
  await new Promise((r) => p.on('close', r));
  children.delete(p);
  const line = out.split('\n').find((l) => l.startsWith('BENCH_RESULT '));
  if (!line) die(`wrk printed no result:\n${out}`);
  return JSON.parse(line.slice('BENCH_RESULT '.length));
}

const brokerPort = await broker();
const targets = [
  await relay('none', brokerPort, {}),
  await relay('guarded', brokerPort, { allow: ['127.0.0.1/32'], rateLimit: { perSecond: 1_000_000, burst: 1_000_000 }, auth: AUTH }),
];
const figures = { none: [], guarded: [] };
const cpuFigures = { none: [], guarded: [] };
let lost = false;
process.stdout.write(`bench/guards: ${ROUNDS} rounds of ${SECONDS} s (+${WARMUP} s warm-up), wrk -c${CONNS} -t${THREADS}, ${cpus().length} cores, load ${loadavg()[0].toFixed(2)}\n`);
for (let round = 1; round <= ROUNDS; round++) {
  for (const t of targets) {
    if (WARMUP) await wrk(t, WARMUP);
    const before = await t.published();
    const r = await wrk(t, SECONDS);
    await sleep(200);
    const after = await t.published();
    const published = after.n - before.n;
    const rate = r.ok / (r.duration_us / 1e6);
    // CPU per notification is what the guards add; OK/s also moves with whatever else the
    // machine runs (shared cores), so both are reported.
    const cpuUs = ((after.cpu - before.cpu) * 1e6) / Math.max(1, r.ok);
    const bad = r.bad_status + r.bad_body;
    if (bad || published < r.ok) lost = true;
    figures[t.name].push(rate);
    cpuFigures[t.name].push(cpuUs);
    process.stdout.write(
      `  round ${round} ${t.name.padEnd(8)} ${rate.toFixed(0).padStart(6)} OK/s  ${cpuUs.toFixed(1).padStart(5)} CPU µs/notification  p50 ${(r.lat_p50_us / 1000).toFixed(2)} ms  p99 ${(r.lat_p99_us / 1000).toFixed(2)} ms  published ${published}/${r.ok}${bad ? `  BAD ${bad}: ${r.sample_bad}` : ''}\n`,
    );
  }
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const none = median(figures.none);
const guarded = median(figures.guarded);
const ratio = guarded / none;
const cpuNone = median(cpuFigures.none);
const cpuGuarded = median(cpuFigures.guarded);
process.stdout.write(
  `median: none ${none.toFixed(0)} OK/s, guarded ${guarded.toFixed(0)} OK/s, ratio ${ratio.toFixed(3)} (goal >= 0.90: ${ratio >= 0.9 ? 'met' : 'MISSED'})\n` +
    `median CPU per notification: none ${cpuNone.toFixed(1)} µs, guarded ${cpuGuarded.toFixed(1)} µs (+${(((cpuGuarded - cpuNone) / cpuNone) * 100).toFixed(1)}%)\n`,
);
// The guard chain alone, in this process, on the request value the API builds: what the
// guards cost per call without the shared machine's noise in it.
{
  const { createGuards, clientResolver } = await import(join(ROOT, 'dist/src/guards.js'));
  const refusals = { refused() {}, size: () => 0, stop() {} };
  const chain = createGuards({ allow: ['127.0.0.1/32'], rateLimit: { perSecond: 1e9, burst: 1e9 }, auth: AUTH }, { refusals, clientOf: clientResolver(undefined) });
  const authorization = `Basic ${Buffer.from(`${AUTH.username}:${AUTH.password}`).toString('base64')}`;
  const N = 1_000_000;
  let refused = 0;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < N; i++) {
    const req = { endpoint: 'send_push', authorization, userAgent: 'Mattermost-Bot/1.1', remoteAddress: '127.0.0.1', forwardedFor: undefined };
    for (const g of chain) if (g(req)) refused++;
  }
  const ns = Number(process.hrtime.bigint() - t0) / N;
  process.stdout.write(`guard chain alone (allowlist + rate limit + basic auth): ${ns.toFixed(0)} ns per call${refused ? ` (${refused} refused: bug)` : ''}\n`);
}
if (lost) die('an answer was not OK or a publish is missing');
process.exit(0);
