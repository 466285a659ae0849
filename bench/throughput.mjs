#!/usr/bin/env node
// Throughput benchmark: the relay against the naive relay, the ceiling and the seed, side by
// side, in one run.
//
//   (r) relay    node dist/src/cli.js serve (default config), publishing QoS 1 to a mosquitto
//                this script starts
//   (n) naive    bench/naive.mjs: the relay a user would write instead, node:http and one mqtt.js
//                connection, QoS 1 publish of the text, OK in its callback, no validation; its
//                own mosquitto
//   (a) ceiling  bench/ceiling.mjs: bare node:http that reads the body and answers {"status":"OK"}
//   (b) seed     bench/seed.py: bottle's default (single-threaded wsgiref) server, one fresh MQTT
//                connection per notification via paho publish.single, QoS 0: the seed's approach
//
// Load: wrk -c16 -t2 with bench/post.lua (the realistic payload, no Content-Type, User-Agent
// Mattermost-Bot/1.1, a fresh ack_id per request); each answer must be 2xx with
// {"status":"OK"}. Rounds are interleaved (r, n, a, b, r, n, a, b, ...), each a warm-up then a
// measured run; a target's figure is its median OK answers per second over its rounds. Rounds
// alternate in order (ABBA), and relay / naive is also given round by round.
// For (r), (n) and (b) a mosquitto_sub (QoS 0, mm/#; BENCH_SUB_QOS=1 for QoS 1) counts what reaches
// a subscriber during the round: it must equal what the server says it published, which must
// cover every OK answer.
//
// TIME_WAIT and the seed: the seed makes two TCP connections per notification (wsgiref closes
// the HTTP connection after each answer; paho connects to the broker each time), and each
// leaves TIME_WAIT sockets for 60 s. On a kernel that cannot reuse them it runs out of
// ephemeral ports after ~28k requests and answers 500; on this one (tcp_tw_reuse=2) connect()
// slows as they pile up (1,300 req/s from a clean state, ~450 after 20 s of load). So the seed
// runs in short rounds (BENCH_SECONDS), each from a clean state: inside a fresh network namespace
// of its own (unshare -n, as root: its broker, subscriber and wrk run there too), else in the
// host's after a bounded wait for TIME_WAIT sockets to drain below BENCH_TW_LIMIT. No sysctl
// is changed.
//
// Env: BENCH_SECONDS (5), BENCH_WARMUP (2), BENCH_ROUNDS (3), BENCH_CONNECTIONS (16),
//      BENCH_THREADS (2), BENCH_PAYLOAD (a payload file), BENCH_TARGETS (relay,naive,ceiling,seed),
//      BENCH_TW_LIMIT (2000), BENCH_NETNS (1; 0 = never use a network namespace).
// Exit: 0 when every target ran and nothing was lost (a missed ratio is reported, not fatal);
//       1 when a tool is missing, a target failed to start or run, or a message was lost.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { cpus, loadavg, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from './lib.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, '..');
const HOST = '127.0.0.1';

const num = (name, dflt, min, max) => {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return dflt;
  const v = Number(raw);
  if (!Number.isFinite(v) || v < min || v > max) die(`${name}=${raw}: expected a number from ${min} to ${max}`);
  return v;
};
const SECONDS = num('BENCH_SECONDS', 5, 1, 600);
const WARMUP = num('BENCH_WARMUP', 2, 0, 600);
const ROUNDS = Math.round(num('BENCH_ROUNDS', 3, 1, 50));
const CONNS = Math.round(num('BENCH_CONNECTIONS', 16, 1, 1000));
const THREADS = Math.round(num('BENCH_THREADS', 2, 1, 64));
const SUB_QOS = process.env.BENCH_SUB_QOS === '1' ? '1' : '0';
const TW_LIMIT = Math.round(num('BENCH_TW_LIMIT', 2000, 0, 1_000_000));
const USE_NETNS = num('BENCH_NETNS', 1, 0, 1) === 1;
const TARGETS = ['relay', 'naive', 'ceiling', 'seed'];
const WANTED = (process.env.BENCH_TARGETS || TARGETS.join(',')).split(',').map((s) => s.trim());
for (const w of WANTED) if (!TARGETS.includes(w)) die(`BENCH_TARGETS: unknown target "${w}" (${TARGETS.join(', ')})`);

// Issue 7: with validation, routing, dedup, metrics and the outbox on, the relay does at least
// what the naive relay does, and 8 times the seed, losing nothing. The ceiling is shown for
// reference: what node:http alone can do here.
const GOALS = { naiveRatio: 1.0, seedRatio: 8 };

const TOOLS = {
  wrk: '/usr/bin/wrk',
  mosquitto: '/usr/sbin/mosquitto',
  mosquitto_sub: '/usr/bin/mosquitto_sub',
  mosquitto_pub: '/usr/bin/mosquitto_pub',
  python3: '/usr/bin/python3',
};

// ---------------------------------------------------------------- children and cleanup

const children = new Set();
let tmp;

function die(message) {
  process.stderr.write(`bench: ${message}\n`);
  cleanup();
  process.exit(1);
}

/** Spawns a child we own; keeps the tail of its output (its pipes are always drained). */
function start(name, cmd, args, { onStdout, ...opts } = {}) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  const proc = { name, child, tail: '', exited: false, code: null };
  const keep = (chunk) => {
    proc.tail = (proc.tail + chunk.toString()).slice(-4000);
  };
  child.stdout?.on('data', onStdout ?? keep);
  child.stderr?.on('data', keep);
  child.on('error', (err) => keep(`cannot run ${cmd}: ${err.message}\n`));
  proc.done = new Promise((res) =>
    child.on('close', (code, signal) => {
      proc.exited = true;
      proc.code = code ?? signal;
      children.delete(proc);
      res(proc.code);
    }),
  );
  children.add(proc);
  return proc;
}

/** Runs a short command to its end (killed after `ms`); resolves with its exit code and stdout. */
async function run(name, cmd, args, ms = 10_000) {
  let out = '';
  const proc = start(name, cmd, args, { onStdout: (c) => (out = (out + c).slice(-100_000)) });
  const t = setTimeout(() => stop(proc, 500), ms);
  const code = await proc.done;
  clearTimeout(t);
  return { code, out, err: proc.tail };
}

async function stop(proc, ms = 3000) {
  if (proc.exited) return;
  const kill = (sig) => {
    try {
      process.kill(proc.child.pid, sig);
    } catch {}
  };
  kill('SIGTERM');
  const t = setTimeout(() => kill('SIGKILL'), ms);
  await Promise.race([proc.done, sleep(ms + 1000)]);
  clearTimeout(t);
}

function cleanup() {
  for (const proc of children) {
    try {
      process.kill(proc.child.pid, 'SIGKILL');
    } catch {}
  }
  children.clear();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
  tmp = undefined;
}
process.on('exit', cleanup);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    process.stderr.write(`\nbench: ${sig}, stopping children\n`);
    cleanup();
    process.exit(130);
  });
}
process.on('uncaughtException', (err) => die(`bug: ${err.stack ?? err}`));
process.on('unhandledRejection', (err) => die(`bug: ${err?.stack ?? err}`));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `probe` until it returns a truthy value; undefined after `ms`. */
async function until(probe, ms, every = 100) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v) return v;
    } catch {}
    await sleep(every);
  }
  return undefined;
}

// ---------------------------------------------------------------- where processes run

/** The host's network: random free ports, node's own fetch and connect. */
const hostNet = {
  name: 'host network',
  wrap: (cmd, args) => [cmd, args],
  port: () => freePort(HOST),
  async get(url, ms = 5000) {
    const res = await fetch(url, { signal: AbortSignal.timeout(ms) });
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return res.text();
  },
  open: (port) =>
    new Promise((res) => {
      const s = connect(port, HOST);
      s.once('connect', () => {
        s.destroy();
        res(true);
      });
      s.once('error', () => res(false));
    }),
  async close() {},
};

const PY_GET = 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())';
const PY_OPEN = 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()';

/**
 * A fresh network namespace (its own loopback, so no TIME_WAIT socket from earlier rounds):
 * held open by a sleeping process, entered with nsenter. We reach into it with short python3
 * commands run there.
 */
async function freshNet() {
  let up = false;
  const holder = start('netns', '/usr/bin/unshare', ['-n', '--', '/bin/sh', '-c', 'ip link set lo up && echo up && exec sleep 3600'], {
    onStdout: (c) => (up ||= c.toString().includes('up')),
  });
  if (!(await until(() => up || holder.exited, 5000, 20)) || !up) return { error: holder.tail.trim() || 'no answer' };
  const pid = String(holder.child.pid);
  const wrap = (cmd, args) => ['/usr/bin/nsenter', ['-t', pid, '-n', '--', cmd, ...args]];
  const next = { port: 21000 };
  return {
    name: 'fresh network namespace',
    wrap,
    port: async () => next.port++,
    async get(url) {
      const r = await run('ns-get', ...wrap(TOOLS.python3, ['-c', PY_GET, url]), 15_000);
      if (r.code !== 0) throw new Error(`${url}: ${r.err.trim().split('\n').pop()}`);
      return r.out;
    },
    async open(port) {
      return (await run('ns-open', ...wrap(TOOLS.python3, ['-c', PY_OPEN, String(port)]), 5000)).code === 0;
    },
    close: () => stop(holder),
  };
}

// ---------------------------------------------------------------- pre-flight

function preflight() {
  const missing = [];
  if (!existsSync(TOOLS.wrk)) missing.push(['wrk', 'wrk']);
  if (!existsSync(TOOLS.mosquitto)) missing.push(['mosquitto', 'mosquitto']);
  if (!existsSync(TOOLS.mosquitto_sub) || !existsSync(TOOLS.mosquitto_pub)) missing.push(['mosquitto_sub/pub', 'mosquitto-clients']);
  if (!existsSync(TOOLS.python3)) missing.push(['python3', 'python3']);
  else if (WANTED.includes('seed')) {
    const check = (mod, pkg) => {
      const r = spawnSync(TOOLS.python3, ['-c', `import ${mod}`], { stdio: 'ignore', timeout: 10_000 });
      if (r.status !== 0) missing.push([`python3 module ${mod}`, pkg]);
    };
    check('bottle', 'python3-bottle');
    check('paho.mqtt.publish', 'python3-paho-mqtt');
  }
  if (missing.length) {
    die(
      `missing: ${missing.map((m) => m[0]).join(', ')}\n` +
        `install with: apt-get install -y ${[...new Set(missing.map((m) => m[1]))].join(' ')}`,
    );
  }
  if (WANTED.includes('naive') && !existsSync(join(ROOT, 'node_modules/mqtt'))) die('node_modules/mqtt is missing: run npm ci');
  if (WANTED.includes('relay') && !existsSync(join(ROOT, 'dist/src/cli.js'))) {
    die('dist/src/cli.js is missing: build first (npx tsc -p tsconfig.json), or run npm run bench');
  }
}

/** The realistic payload: BENCH_PAYLOAD, else the test fixture in the repository. */
function payload() {
  const file = process.env.BENCH_PAYLOAD || resolve(ROOT, 'test/fixtures/payloads/01-channel-post-full.json');
  return { file, body: readFileSync(file) };
}

// ---------------------------------------------------------------- the pieces

let confs = 0;
async function startBroker(net) {
  const port = await net.port();
  const conf = join(tmp, `mosquitto-${++confs}.conf`);
  // max_queued_messages: mosquitto silently drops messages queued for a client beyond it
  // (default 1000; for QoS 0 it counts the packets waiting to be written), so a subscriber
  // that falls behind for a moment would lose messages.
  // max_inflight_messages 0: no limit on unacknowledged messages in flight to one client.
  writeFileSync(
    conf,
    [
      `listener ${port} ${HOST}`,
      'allow_anonymous true',
      'persistence false',
      'max_inflight_messages 0',
      'max_queued_messages 1000000',
      'max_queued_bytes 0',
      'log_dest stderr',
      'log_type error',
      'log_type warning',
      '',
    ].join('\n'),
  );
  const proc = start('mosquitto', ...net.wrap(TOOLS.mosquitto, ['-c', conf]));
  const up = await until(async () => !proc.exited && (await net.open(port)), 8000, 100);
  if (!up) die(`mosquitto did not start on port ${port} (${net.name}):\n${proc.tail}`);
  return { proc, port, net };
}

async function startRelay(broker) {
  const port = await hostNet.port();
  // Its default config (what `push-relay serve` does with no file), except where it keeps its
  // state (outbox, dedup): our temp dir, fresh for each run, never the repo's ./data.
  // Through its shebang, as npm start and the bin run it (with the relay's V8 flags).
  const proc = start('relay', join(ROOT, 'dist/src/cli.js'), ['serve'], {
    cwd: tmp,
    env: {
      ...process.env,
      PUSH_RELAY_CONFIG: '',
      PUSH_RELAY_DATA_DIR: join(tmp, 'relay-data'),
      PUSH_RELAY_HOST: HOST,
      PUSH_RELAY_PORT: String(port),
      PUSH_RELAY_MQTT_URL: `mqtt://${HOST}:${broker.port}`,
      PUSH_RELAY_LOG_LEVEL: 'warn',
      PUSH_RELAY_LOG_FORMAT: 'json',
    },
  });
  const url = `http://${HOST}:${port}`;
  const ready = await until(async () => !proc.exited && (await hostNet.get(`${url}/readyz`, 1000)), 15_000, 200);
  if (!ready) die(`relay (r) did not start (${proc.exited ? `exited ${proc.code}` : 'no ready answer on /readyz'}):\n${proc.tail}`);
  return {
    proc,
    url,
    net: hostNet,
    broker,
    /**
     * The server's own count of publishes the broker acknowledged (the MQTT sink's delivered
     * outcomes), and any outcome other than delivered or skipped, by outcome/reason.
     */
    async published() {
      const text = await hostNet.get(`${url}/metrics`);
      let delivered = 0;
      const other = {};
      for (const line of text.split('\n')) {
        const m = /^push_relay_sink_outcomes_total\{([^}]*)\}\s+(\S+)/.exec(line);
        if (!m || !/sink="mqtt"/.test(m[1])) continue;
        const outcome = /outcome="([^"]*)"/.exec(m[1])?.[1];
        const key = `${outcome}/${/reason="([^"]*)"/.exec(m[1])?.[1]}`;
        if (outcome === 'delivered') delivered += Number(m[2]);
        else if (Number(m[2]) > 0) other[key] = (other[key] ?? 0) + Number(m[2]);
      }
      return { published: delivered, other };
    },
  };
}

async function startNaive(broker) {
  const port = await hostNet.port();
  const proc = start('naive', process.execPath, [join(HERE, 'naive.mjs'), HOST, String(port), String(broker.port)]);
  const url = `http://${HOST}:${port}`;
  // Up once it answers and its one MQTT connection is open (publishes before that would queue).
  const ready = await until(async () => !proc.exited && JSON.parse(await hostNet.get(`${url}/_published`, 1000)).connected, 10_000, 100);
  if (!ready) die(`naive (n) did not start (${proc.exited ? `exited ${proc.code}` : 'no answer, or not connected to its broker'}):\n${proc.tail}`);
  return {
    proc,
    url,
    net: hostNet,
    broker,
    /** Its count of publishes the broker acknowledged (the callback without an error). */
    async published() {
      return { published: JSON.parse(await hostNet.get(`${url}/_published`)).published, other: {} };
    },
  };
}

async function startCeiling() {
  const port = await hostNet.port();
  const proc = start('ceiling', process.execPath, [join(HERE, 'ceiling.mjs'), HOST, String(port)]);
  const ready = await until(async () => !proc.exited && (await hostNet.open(port)), 10_000);
  if (!ready) die(`ceiling (a) did not start:\n${proc.tail}`);
  return { proc, url: `http://${HOST}:${port}`, net: hostNet };
}

async function startSeed(net, broker) {
  const port = await net.port();
  const proc = start('seed', ...net.wrap(TOOLS.python3, [join(HERE, 'seed.py'), HOST, String(port), String(broker.port)]), {
    env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' },
  });
  const url = `http://${HOST}:${port}`;
  const ready = await until(async () => !proc.exited && (await net.get(`${url}/_published`)), 15_000, 200);
  if (!ready) die(`seed (b) did not start (${proc.exited ? `exited ${proc.code}` : 'no answer'}; ${net.name}):\n${proc.tail}`);
  return {
    proc,
    url,
    net,
    broker,
    async published() {
      return { published: JSON.parse(await net.get(`${url}/_published`)).published, other: {} };
    },
  };
}

/**
 * A mosquitto_sub on mm/# that writes each message's topic, one a line, to a file (not a pipe
 * to this process: reading 15 000 lines a second here took ~10% of a core from the servers
 * being measured). Ready once a probe published to mm/_bench_probe comes back; `count()`
 * counts only mm/_notif.
 *
 * It subscribes at QoS 0 (SUB_QOS): the checker then costs the same per message whoever
 * published it. The seed publishes at QoS 0, so a QoS 1 subscription got the seed's messages
 * at QoS 0 anyway, but made the broker and the subscriber exchange a PUBACK for each of the
 * relay's: on 2 cores, ~25% of a core taken from the relay's rounds alone. The relay still
 * publishes at QoS 1 and answers OK only on the broker's PUBACK. A QoS 0 message to a
 * connected subscriber is dropped only past max_queued_messages (1 000 000 here), and a drop
 * would be counted as lost: the check can raise a false alarm, never hide a loss.
 */
let subscribers = 0;
async function startSubscriber(broker) {
  const { net, port } = broker;
  const file = join(tmp, `subscriber-${++subscribers}.out`);
  const out = openSync(file, 'w');
  const lines = (topic) => {
    const text = readFileSync(file, 'latin1');
    let n = 0;
    for (let i = text.indexOf(`${topic}\n`); i >= 0; i = text.indexOf(`${topic}\n`, i + 1)) if (i === 0 || text[i - 1] === '\n') n++;
    return n;
  };
  const sub = { count: () => lines('mm/_notif') };
  sub.proc = start(
    'subscriber',
    ...net.wrap(TOOLS.mosquitto_sub, ['-h', HOST, '-p', String(port), '-t', 'mm/#', '-q', SUB_QOS, '-F', '%t', '-i', `bench-sub-${process.pid}-${Date.now()}`]),
    { stdio: ['ignore', out, 'pipe'] },
  );
  closeSync(out);
  const probe = ['-h', HOST, '-p', String(port), '-t', 'mm/_bench_probe', '-m', 'probe', '-q', '1'];
  const ready = await until(
    async () => {
      if (lines('mm/_bench_probe') > 0) return true;
      await run('probe', ...net.wrap(TOOLS.mosquitto_pub, probe), 3000);
      return until(() => lines('mm/_bench_probe') > 0, 300, 20);
    },
    10_000,
    100,
  );
  if (!ready) die(`the counting subscriber did not come up:\n${sub.proc.tail}`);
  return sub;
}

let wrkRuns = 0; // gives each wrk run its own ack_id prefix (see post.lua)
async function runWrk(net, url, seconds) {
  const args = [`-c${CONNS}`, `-t${THREADS}`, `-d${seconds}s`, '--timeout', '5s', '-s', join(HERE, 'post.lua'), url];
  let out = '';
  const proc = start('wrk', ...net.wrap(TOOLS.wrk, args), {
    env: { ...process.env, BENCH_PAYLOAD: payloadFile, BENCH_RUN: String(++wrkRuns) },
    onStdout: (c) => (out = (out + c).slice(-20_000)),
  });
  const killer = setTimeout(() => stop(proc), (seconds + 20) * 1000);
  // wrk's own CPU time, sampled just before it exits (the load generator shares the 2 cores).
  let wrkCpu = NaN;
  const sampler = setInterval(() => {
    const c = cpuSeconds(proc.child.pid);
    if (Number.isFinite(c)) wrkCpu = c;
  }, 100);
  const code = await proc.done;
  clearInterval(sampler);
  clearTimeout(killer);
  const m = /^BENCH_RESULT (\{.*\})$/m.exec(out);
  if (!m) return { error: `wrk exited ${code} without a result:\n${out.slice(-1500)}${proc.tail}` };
  const r = JSON.parse(m[1]);
  r.seconds = r.duration_us / 1e6;
  r.okPerSec = r.ok / r.seconds;
  r.wrkCpu = wrkCpu;
  return r;
}

/** utime+stime of a process in seconds (Linux /proc). */
function cpuSeconds(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return NaN;
  }
}

function timeWait() {
  try {
    const m = /TCP:.*\btw (\d+)/.exec(readFileSync('/proc/net/sockstat', 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

// ---------------------------------------------------------------- one round

async function round(t) {
  const sub = t.published ? await startSubscriber(t.broker) : undefined;
  const before = t.published ? await t.published() : undefined;

  const warm = WARMUP > 0 ? await runWrk(t.net, t.url, WARMUP) : { ok: 0, bad_status: 0, bad_body: 0 };
  if (warm.error) return { error: warm.error };
  const cpu0 = { target: cpuSeconds(t.proc.child.pid), broker: t.broker ? cpuSeconds(t.broker.proc.child.pid) : NaN };
  const r = await runWrk(t.net, t.url, SECONDS);
  if (r.error) return { error: r.error };
  r.cpu = {
    target: (cpuSeconds(t.proc.child.pid) - cpu0.target) / r.seconds,
    broker: t.broker ? (cpuSeconds(t.broker.proc.child.pid) - cpu0.broker) / r.seconds : NaN,
    wrk: r.wrkCpu / r.seconds,
  };
  r.warm = warm;
  if (t.proc.exited) return { error: `exited (${t.proc.code}) during the round:\n${t.proc.tail}` };
  if (!t.published) return r;

  // The server may still be finishing requests wrk left unanswered when its time ran out: wait
  // until its count holds still for a second, then for the subscriber to catch up with it.
  let last = -1;
  let seen = 0;
  await until(async () => {
    const now = (await t.published()).published;
    seen = now === last ? seen + 1 : 0;
    last = now;
    return seen >= 3;
  }, 20_000, 350);
  let now = await t.published();
  await until(() => sub.count() >= now.published - before.published, 15_000, 100);
  await sleep(500); // anything beyond what was published would show up here
  now = await t.published();
  const published = now.published - before.published;
  const received = sub.count();
  await stop(sub.proc);
  const other = {};
  for (const [k, v] of Object.entries(now.other)) if (v - (before.other[k] ?? 0) > 0) other[k] = v - (before.other[k] ?? 0);
  const answeredOk = warm.ok + r.ok;
  return Object.assign(r, {
    published,
    received,
    answeredOk,
    otherOutcomes: other,
    // Lost: published by the server but never received, or answered OK but never published.
    lost: Math.max(0, published - received) + Math.max(0, answeredOk - published),
    extra: Math.max(0, received - published),
  });
}

/** A seed round from a clean network state: a fresh namespace, else a bounded wait. */
async function seedRound(note) {
  let net = hostNet;
  if (USE_NETNS) {
    const ns = await freshNet();
    if (ns.error) {
      note(`cannot make a network namespace (${ns.error.split('\n').pop()}); the seed runs in the host's`);
      netnsBroken = true;
    } else net = ns;
  }
  if (net === hostNet) {
    const tw = timeWait();
    if (tw > TW_LIMIT) {
      note(`waiting (at most 65 s) for ${tw} TIME_WAIT sockets to drain below ${TW_LIMIT}`);
      await until(() => timeWait() <= TW_LIMIT, 65_000, 500);
    }
  }
  const twBefore = net === hostNet ? timeWait() : 0;
  const broker = await startBroker(net);
  const seed = await startSeed(net, broker);
  try {
    const r = await round(seed);
    if (!r.error) Object.assign(r, { net: net.name, twBefore });
    return r;
  } finally {
    await stop(seed.proc);
    await stop(broker.proc);
    await net.close();
  }
}
let netnsBroken = false;

// ---------------------------------------------------------------- report

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const fmt = (x) => (Number.isFinite(x) ? Math.round(x).toLocaleString('en-US') : 'n/a');
const pct = (x) => (Number.isFinite(x) ? `${Math.round(x * 100)}%` : 'n/a');
/**
 * The server's CPU time per OK answer in the measured run, in µs. Steadier than OK/s on a
 * shared machine: a server starved of CPU answers fewer, but each costs it about the same.
 */
const cpuPerOk = (r) => (r.cpu.target * r.seconds * 1e6) / r.ok;
const LABEL = { relay: 'relay (r)', naive: 'naive (n)', ceiling: 'ceiling (a)', seed: 'seed (b)' };

function describe(key, n, r) {
  const errs = r.err_connect + r.err_read + r.err_write + r.err_timeout;
  let line =
    `  round ${n} ${LABEL[key].padEnd(12)} ${fmt(r.okPerSec).padStart(7)} OK/s  ` +
    `(${fmt(r.ok)} OK in ${r.seconds.toFixed(1)} s; latency p50 ${(r.lat_p50_us / 1000).toFixed(1)} ms, p99 ${(r.lat_p99_us / 1000).toFixed(1)} ms; ` +
    `cpu: ${key} ${pct(r.cpu.target)}${Number.isFinite(r.cpu.broker) ? `, broker ${pct(r.cpu.broker)}` : ''}, wrk ${pct(r.cpu.wrk)}; ` +
    `${fmt(cpuPerOk(r))} µs of ${key} CPU per OK)`;
  const bad = [];
  if (r.bad_status) bad.push(`${fmt(r.bad_status)} non-2xx`);
  if (r.bad_body) bad.push(`${fmt(r.bad_body)} bodies not OK`);
  if (errs) bad.push(`socket errors: connect ${r.err_connect}, read ${r.err_read}, write ${r.err_write}, timeout ${r.err_timeout}`);
  if (r.warm.bad_status || r.warm.bad_body) bad.push(`warm-up: ${r.warm.bad_status} non-2xx, ${r.warm.bad_body} bodies not OK`);
  if (bad.length) line += `\n      !! ${bad.join('; ')}${r.sample_bad ? ` (e.g. ${r.sample_bad})` : ''}`;
  if (r.net) line += `\n      ran in: ${r.net}${r.net === hostNet.name ? ` (${fmt(r.twBefore)} TIME_WAIT sockets at its start)` : ''}`;
  if (r.published !== undefined) {
    line +=
      `\n      mqtt: ${fmt(r.published)} published, ${fmt(r.received)} received by the subscriber, ` +
      `${fmt(r.answeredOk)} answered OK (warm-up + run): lost ${r.lost}` +
      (r.extra ? `, ${r.extra} received but not counted as published` : '') +
      (Object.keys(r.otherOutcomes).length ? `; other sink outcomes: ${JSON.stringify(r.otherOutcomes)}` : '');
  }
  return line;
}

// ---------------------------------------------------------------- main

let payloadFile;

async function main() {
  preflight();
  tmp = mkdtempSync(join(tmpdir(), 'push-relay-bench-'));
  const p = payload();
  payloadFile = join(tmp, 'payload.json');
  writeFileSync(payloadFile, p.body);

  // Every wait below is bounded; this is the backstop for the whole run.
  const budget = (ROUNDS * WANTED.length * (SECONDS + WARMUP + 100) + 120) * 1000;
  setTimeout(() => die(`the run took over ${Math.round(budget / 1000)} s; giving up`), budget).unref();

  const git = spawnSync('git', ['-C', ROOT, 'describe', '--always', '--dirty'], { encoding: 'utf8', timeout: 5000 });
  const load = (SECONDS + WARMUP) * WANTED.length * ROUNDS;
  process.stdout.write(
    `push-relay throughput: ${WANTED.join(', ')}; ${ROUNDS} round(s) each of ${WARMUP} s warm-up + ${SECONDS} s measured, ` +
      `interleaved; wrk -c${CONNS} -t${THREADS}; ${load} s of load\n` +
      `payload: ${p.file} (${p.body.length} bytes, fresh ack_id per request), POST /api/v1/send_push, no Content-Type, ` +
      `User-Agent Mattermost-Bot/1.1\n` +
      `relay: dist/src/cli.js from ${git.status === 0 ? git.stdout.trim() : 'an unknown commit'}, default config; node ${process.version}\n` +
      `seed: short rounds, each from a clean network state (its TIME_WAIT sockets slow it down; see bench/README.md)\n` +
      `loss check: a mosquitto_sub on mm/# at QoS ${SUB_QOS} (BENCH_SUB_QOS), counting into a file\n` +
      `machine: ${cpus().length} cores, load average ${loadavg()[0].toFixed(2)} at start` +
      `${loadavg()[0] > 0.5 ? ' (something else is using the CPU: expect noisy figures)' : ''}\n\n`,
  );

  const targets = [];
  let hostBroker;
  if (WANTED.includes('relay')) {
    hostBroker = await startBroker(hostNet);
    targets.push(['relay', await startRelay(hostBroker)]);
  }
  if (WANTED.includes('naive')) targets.push(['naive', await startNaive(await startBroker(hostNet))]);
  if (WANTED.includes('ceiling')) targets.push(['ceiling', await startCeiling()]);
  if (WANTED.includes('seed')) targets.push(['seed', undefined]);
  const results = new Map(targets.map(([k]) => [k, []]));

  for (let n = 1; n <= ROUNDS; n++) {
    // ABBA: every other round runs the targets in reverse, so a machine that slows down or
    // speeds up during the run favours none of them.
    for (const [key, t] of n % 2 ? targets : [...targets].reverse()) {
      const note = (s) => process.stdout.write(`  (${s})\n`);
      const r = key === 'seed' ? await seedRound(note) : await round(t);
      if (r.error) die(`${LABEL[key]}, round ${n}: ${r.error}`);
      results.get(key).push(r);
      process.stdout.write(`${describe(key, n, r)}\n`);
      if (hostBroker?.proc.exited) die(`mosquitto exited (${hostBroker.proc.code}):\n${hostBroker.proc.tail}`);
    }
  }

  const med = Object.fromEntries([...results].map(([k, rs]) => [k, median(rs.map((r) => r.okPerSec))]));
  const sum = (k, f) => (results.get(k) ?? []).reduce((s, r) => s + f(r), 0);
  const lost = (k) => sum(k, (r) => r.lost ?? 0);
  const notOk = (k) => sum(k, (r) => r.bad_status + r.bad_body + r.warm.bad_status + r.warm.bad_body);

  process.stdout.write('\nmedian OK answers per second\n');
  for (const [key] of targets) {
    const each = results.get(key).map((r) => fmt(r.okPerSec)).join(', ');
    const l = key === 'ceiling' ? '' : `; lost ${lost(key)}`;
    process.stdout.write(`  ${LABEL[key].padEnd(12)} ${fmt(med[key]).padStart(7)}   (rounds: ${each}; answers not OK: ${notOk(key)}${l})\n`);
  }
  const cpu = Object.fromEntries([...results].map(([k, rs]) => [k, median(rs.map(cpuPerOk))]));
  process.stdout.write(`median CPU per OK answer: ${targets.map(([k]) => `${k} ${fmt(cpu[k])} µs`).join(', ')}\n`);
  const mark = (ok) => (ok ? 'PASS' : 'MISS');
  process.stdout.write('\n');
  if (med.relay !== undefined && med.naive !== undefined) {
    const x = med.relay / med.naive;
    process.stdout.write(`relay / naive     ${x.toFixed(2).padStart(5)}x   target >= ${GOALS.naiveRatio.toFixed(1)}x    ${mark(x >= GOALS.naiveRatio)}` +
      `   (CPU per OK: naive / relay ${(cpu.naive / cpu.relay).toFixed(2)}x)\n`);
    // The same ratio within each round, where the two ran next to each other: less exposed to a
    // shared machine's slow minutes than the ratio of medians.
    const paired = results.get('relay').map((r, i) => r.okPerSec / results.get('naive')[i].okPerSec);
    process.stdout.write(`  paired by round: median ${median(paired).toFixed(2)}x (${paired.map((p) => `${p.toFixed(2)}x`).join(', ')})\n`);
  }
  if (med.relay !== undefined && med.seed !== undefined) {
    const x = med.relay / med.seed;
    process.stdout.write(`relay / seed      ${x.toFixed(1).padStart(5)}x   target >= ${GOALS.seedRatio}x      ${mark(x >= GOALS.seedRatio)}\n`);
  }
  if (med.relay !== undefined && med.ceiling !== undefined) {
    const x = med.relay / med.ceiling;
    process.stdout.write(`relay / ceiling   ${x.toFixed(2).padStart(5)}x   (for reference: node:http alone)\n`);
  }
  const lossy = ['relay', 'naive', 'seed'].filter((k) => results.has(k));
  const lossFree = lossy.every((k) => lost(k) === 0);
  if (lossy.length) {
    process.stdout.write(
      `loss              ${lossy.map((k) => `${k} ${lost(k)}`).join(', ')}   target 0   ${lossFree ? 'PASS' : 'FAIL'}\n`,
    );
  }
  if (results.has('relay') && notOk('relay')) process.stdout.write(`relay answers not OK: ${notOk('relay')} (every valid push should be OK)\n`);
  const relay = targets.find(([k]) => k === 'relay')?.[1];
  if (relay?.proc.tail.trim()) {
    const lines = relay.proc.tail.trim().split('\n');
    process.stdout.write(`\nthe relay logged (warn and above), last ${Math.min(3, lines.length)} line(s):\n  ${lines.slice(-3).join('\n  ')}\n`);
  }
  if (netnsBroken) process.stdout.write('\nnote: no network namespace (needs root and unshare); the seed ran in the host network after waiting for TIME_WAIT\n');

  for (const proc of [...children]) await stop(proc);
  cleanup();
  process.exit(lossFree ? 0 : 1);
}

await main();
