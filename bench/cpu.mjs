#!/usr/bin/env node
// CPU time per notification, and where it goes: the relay under a steady wrk load, its CPU time
// read from /proc over the OK answers, optionally with V8's sampling profiler (--cpu-prof),
// summarised by function and by file. Less sensitive to a busy machine than OK/s: the CPU a
// notification costs changes little when another process takes the other core.
//
//   node bench/cpu.mjs [--prof] [--seconds 10] [--relay DIR]   (DIR: another checkout, built)
//   node bench/cpu.mjs --naive [--prof]                         (bench/naive.mjs instead, same load)
//   node bench/cpu.mjs --prof --prof-out FILE                   (also keeps the .cpuprofile, for Chrome's DevTools)
//
// Needs /usr/sbin/mosquitto and /usr/bin/wrk. Everything binds 127.0.0.1 on free ports; temp
// files go to os.tmpdir(). Prints one line "µs per notification" and, with --prof, the top
// functions by self time.
import { spawn } from 'node:child_process';
import { copyFileSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from './lib.mjs';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const opt = (name, d) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : d;
};
const PROF = args.includes('--prof');
const SECONDS = Math.min(120, Math.max(2, Number(opt('--seconds', 10))));
const RELAY_DIR = resolve(opt('--relay', ROOT));
const NAIVE = args.includes('--naive');
const tmp = mkdtempSync(join(tmpdir(), 'push-relay-cpu-'));
const children = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function run(cmd, argv, opts = {}) {
  const child = spawn(cmd, argv, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (out += d));
  children.push(child);
  return { child, output: () => out, exited: new Promise((r) => child.once('exit', r)) };
}

async function until(what, test, ms = 10_000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await test()) return;
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}`);
}

function cpuSeconds(pid) {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime + stime, clock ticks
}

async function main() {
  const mqttPort = await freePort();
  const httpPort = await freePort();
  writeFileSync(join(tmp, 'mosquitto.conf'), `listener ${mqttPort} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\n`);
  run('/usr/sbin/mosquitto', ['-c', join(tmp, 'mosquitto.conf')]);
  await sleep(300);
  const server = NAIVE ? [join(ROOT, 'bench/naive.mjs'), '127.0.0.1', String(httpPort), String(mqttPort)] : [join(RELAY_DIR, 'dist/src/cli.js'), 'serve'];
  const nodeArgs = [...(NAIVE ? [] : ['--max-semi-space-size=8']), ...(PROF ? ['--cpu-prof', '--cpu-prof-dir', tmp] : []), ...server];
  const relay = run(process.execPath, nodeArgs, {
    cwd: tmp,
    env: {
      ...process.env,
      PUSH_RELAY_HOST: '127.0.0.1',
      PUSH_RELAY_PORT: String(httpPort),
      PUSH_RELAY_MQTT_URL: `mqtt://127.0.0.1:${mqttPort}`,
      PUSH_RELAY_DATA_DIR: join(tmp, 'data'),
      PUSH_RELAY_LOG_LEVEL: 'warn',
    },
  });
  await until('the relay to listen', async () => {
    try {
      return (await fetch(`http://127.0.0.1:${httpPort}/${NAIVE ? '_published' : 'healthz'}`)).ok;
    } catch {
      return false;
    }
  });
  const payload = join(tmp, 'payload.json');
  writeFileSync(payload, readFileSync(join(ROOT, 'test/fixtures/payloads/01-channel-post-full.json')));
  const wrk = (secs, n) =>
    run('/usr/bin/wrk', ['-c16', '-t2', `-d${secs}s`, '-s', join(ROOT, 'bench/post.lua'), `http://127.0.0.1:${httpPort}/api/v1/send_push`], {
      env: { ...process.env, BENCH_PAYLOAD: payload, BENCH_RUN: String(n) },
    });
  const warm = wrk(2, 1);
  await warm.exited;
  const cpu0 = cpuSeconds(relay.child.pid);
  const load = wrk(SECONDS, 2);
  await load.exited;
  const cpu = cpuSeconds(relay.child.pid) - cpu0;
  const result = JSON.parse(/BENCH_RESULT (\{.*\})/.exec(load.output())[1]);
  const perSecond = result.ok / (result.duration_us / 1e6);
  console.log(
    `${NAIVE ? 'naive' : relative(process.cwd(), RELAY_DIR) || '.'}: ${Math.round(perSecond)} OK/s, relay cpu ${((cpu / SECONDS) * 100).toFixed(0)}%, ` +
      `${((cpu * 1e6) / result.ok).toFixed(1)} µs per notification (${result.ok} OK, ${result.bad_status + result.bad_body} not OK)`,
  );
  relay.child.kill('SIGINT');
  await relay.exited;
  if (PROF) {
    const file = readdirSync(tmp).find((f) => f.endsWith('.cpuprofile'));
    if (opt('--prof-out')) copyFileSync(join(tmp, file), resolve(opt('--prof-out')));
    summarise(file);
  }
}

function summarise(file) {
  const prof = JSON.parse(readFileSync(join(tmp, file), 'utf8'));
  const dt = new Map();
  const ids = prof.samples;
  for (let i = 0; i < ids.length; i++) dt.set(ids[i], (dt.get(ids[i]) ?? 0) + (prof.timeDeltas[i] ?? 0));
  const byFn = new Map();
  const byFile = new Map();
  let total = 0;
  for (const node of prof.nodes) {
    const t = dt.get(node.id) ?? 0;
    if (!t) continue;
    const { functionName, url, lineNumber } = node.callFrame;
    if (functionName === '(idle)' || functionName === '(program)') continue;
    total += t;
    const where = url ? url.replace(/^file:\/\//, '').replace(/.*node_modules\//, 'node_modules/').replace(RELAY_DIR + '/', '') : '';
    const fn = `${functionName || '(anonymous)'} ${where}:${lineNumber + 1}`;
    byFn.set(fn, (byFn.get(fn) ?? 0) + t);
    const area = !where
      ? functionName.startsWith('(') ? functionName : '(native)'
      : where.startsWith('node:') ? where.split('/')[0]
        : where.startsWith('node_modules/') ? where.split('/').slice(0, where.startsWith('node_modules/@') ? 3 : 2).join('/')
          : where;
    byFile.set(area, (byFile.get(area) ?? 0) + t);
  }
  const top = (m, n) => [...m].sort((a, b) => b[1] - a[1]).slice(0, n).map(([k, v]) => `  ${((v / total) * 100).toFixed(1).padStart(5)}%  ${k}`).join('\n');
  console.log(`\nself time by file or package (non-idle):\n${top(byFile, 25)}\n\ntop functions by self time:\n${top(byFn, 30)}`);
}

main()
  .catch((err) => {
    console.error(err);
    process.exitCode = 1;
  })
  .finally(() => {
    for (const c of children) c.kill('SIGKILL');
    rmSync(tmp, { recursive: true, force: true });
  });
