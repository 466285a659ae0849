#!/usr/bin/env node
// Provider benchmark: Mattermost -> relay -> FCM, and Mattermost -> relay -> APNs, against local
// fakes of the two providers, at 64 concurrent requests (Mattermost sends with up to NumCPU x 8
// connections, contract §4.1), beside the same fakes driven directly, in one run.
//
//   fcm-direct   wrk -c64 straight at the FCM fake (HTTPS, HTTP/1.1 keep-alive: wrk has no HTTP/2)
//   fcm-relay    wrk -c64 with bench/post.lua (sample 01) at the relay, whose fcm sink posts to the fake over HTTP/2
//   apns-direct  a node:http2 client here, 64 streams in flight on one session (wrk has no HTTP/2)
//   apns-relay   wrk -c64 with bench/post.lua (sample 02) at the relay, whose apns sink posts to the fake
//
// "p99 added by the relay" is relay p99 minus direct p99. Rounds are interleaved; a figure is
// the median over BENCH_ROUNDS. Then, for reference, firebase-admin's own messaging client
// alone against the fake (what the sink used before it sent over its own HTTP/2 connection):
// send() per message, and sendEach() in batches of 64 on the legacy HTTP/1.1 transport
// (sendEach's default HTTP/2 client dials fcm.googleapis.com itself and ignores httpAgent, so it
// cannot be pointed at a fake).
//
// The fakes run in a child process (this file with BENCH_ROLE=fakes). The relay is
// `node dist/src/cli.js serve` with this file preloaded as BENCH_ROLE=seam: that calls the sinks'
// public seams (useProviderConnection, useFirebaseCredential) so the real host names, TLS
// verification and HTTP clients stay the relay's own while connections go to the fakes.
//
// Env: BENCH_SECONDS (5), BENCH_WARMUP (2), BENCH_ROUNDS (3), BENCH_CONNECTIONS (64),
//      BENCH_THREADS (2), BENCH_TARGETS (fcm-direct,fcm-relay,apns-direct,apns-relay,sdk),
//      BENCH_RELAY_NODE_ARGS (e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof" for the relay process).
import { spawn, execFileSync } from 'node:child_process';
import { generateKeyPairSync, verify } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { connect as http2Connect, createSecureServer } from 'node:http2';
import { Agent } from 'node:https';
import { cpus, loadavg } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { freePort, scratch } from './lib.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, '..');
const ROLE = process.env.BENCH_ROLE;
const PROJECT = 'bench-proj';
const KEY_ID = 'BENCHKEY01';
const TEAM_ID = 'BENCHTEAM1';
const TOPIC = 'com.example.mattermost';

if (ROLE === 'fakes') await runFakes();
else if (ROLE === 'seam') await installSeam();
else await main();

// ------------------------------------------------------------------ the fakes (child process)

async function runFakes() {
  const cert = readFileSync(process.env.BENCH_CERT);
  const key = readFileSync(process.env.BENCH_KEY);
  const publicKey = readFileSync(process.env.BENCH_APNS_PUB);
  let n = 0;
  // HTTP/2 for the relay's sink, HTTP/1.1 for wrk and firebase-admin's legacy transport.
  const fcm = createSecureServer({ cert, key, allowHTTP1: true, settings: { maxConcurrentStreams: 1000 } }, (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      let ok = req.method === 'POST' && req.url === `/v1/projects/${PROJECT}/messages:send` && /^Bearer /.test(req.headers.authorization ?? '');
      try {
        ok &&= typeof JSON.parse(Buffer.concat(chunks).toString()).message.token === 'string';
      } catch {
        ok = false;
      }
      const body = ok ? `{"name":"projects/${PROJECT}/messages/0:${++n}"}` : '{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"bad request"}}';
      res.writeHead(ok ? 200 : 400, { 'content-type': 'application/json; charset=UTF-8', 'content-length': Buffer.byteLength(body) });
      res.end(body);
    });
  });
  fcm.on('session', (s) => s.on('error', () => {}));
  // Verifying every provider token costs what Apple spends, not what a relay does: each distinct
  // token is verified once (it changes every 50 minutes).
  const verified = new Set();
  const apns = createSecureServer({ cert, key, allowHTTP1: false, settings: { maxConcurrentStreams: 1000 } });
  apns.on('session', (s) => s.on('error', () => {}));
  apns.on('stream', (stream, headers) => {
    stream.on('error', () => {});
    const chunks = [];
    stream.on('data', (c) => chunks.push(c));
    stream.on('end', () => {
      let reason = '';
      const token = /^bearer (\S+)$/.exec(headers.authorization ?? '')?.[1];
      if (!token) reason = 'MissingProviderToken';
      else if (!verified.has(token)) {
        const [h, c, sig] = token.split('.');
        if (verify('sha256', Buffer.from(`${h}.${c}`), { key: publicKey, dsaEncoding: 'ieee-p1363' }, Buffer.from(sig, 'base64url'))) verified.add(token);
        else reason = 'InvalidProviderToken';
      }
      if (!reason && !/^\/3\/device\/[0-9a-f]+$/.test(headers[':path'])) reason = 'BadDeviceToken';
      if (!reason && !headers['apns-topic']) reason = 'MissingTopic';
      if (!reason) {
        try {
          JSON.parse(Buffer.concat(chunks).toString());
        } catch {
          reason = 'BadPayload';
        }
      }
      if (stream.destroyed) return;
      if (!reason) {
        stream.respond({ ':status': 200, 'apns-id': `bench-${++n}` });
        stream.end();
      } else {
        stream.respond({ ':status': 400, 'content-type': 'application/json' });
        stream.end(JSON.stringify({ reason }));
      }
    });
  });
  await Promise.all([new Promise((r) => fcm.listen(0, '127.0.0.1', r)), new Promise((r) => apns.listen(0, '127.0.0.1', r))]);
  process.stdout.write(`READY ${fcm.address().port} ${apns.address().port}\n`);
  process.on('SIGTERM', () => process.exit(0));
}

// ------------------------------------------------------------------ the seam (preloaded into the relay)

async function installSeam() {
  const { useProviderConnection } = await import(pathToFileURL(join(ROOT, 'dist', 'sinks', 'provider-net.js')).href);
  const { useFirebaseCredential } = await import(pathToFileURL(join(ROOT, 'dist', 'sinks', 'fcm.js')).href);
  const ca = readFileSync(process.env.BENCH_CERT);
  const ports = { 'fcm.googleapis.com': Number(process.env.BENCH_FCM_PORT), 'api.push.apple.com': Number(process.env.BENCH_APNS_PORT) };
  useProviderConnection(async (o) => {
    const port = ports[o.servername];
    if (!port) throw new Error(`bench seam: no fake for ${o.servername}`);
    return tlsConnect({ ...o, host: '127.0.0.1', port, ca });
  });
  useFirebaseCredential({ getAccessToken: async () => ({ access_token: 'bench-token', expires_in: 3600 }) });
}

// ------------------------------------------------------------------ the run

function num(name, dflt, min, max) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return dflt;
  const v = Number(raw);
  if (!Number.isFinite(v) || v < min || v > max) throw new Error(`${name}=${raw}: expected a number from ${min} to ${max}`);
  return v;
}

async function main() {
  const SECONDS = num('BENCH_SECONDS', 5, 1, 600);
  const WARMUP = num('BENCH_WARMUP', 2, 0, 600);
  const ROUNDS = Math.round(num('BENCH_ROUNDS', 3, 1, 50));
  const CONNS = Math.round(num('BENCH_CONNECTIONS', 64, 1, 1000));
  const THREADS = Math.round(num('BENCH_THREADS', 2, 1, 64));
  const TARGETS = (process.env.BENCH_TARGETS || 'fcm-direct,fcm-relay,apns-direct,apns-relay,sdk').split(',').map((s) => s.trim());
  const { dir: tmp, children, cleanup } = scratch('push-relay-bench-providers-');

  // Certificate for the providers' real names (openssl: node:crypto does not sign X.509), the
  // APNs key pair, a service-account file naming the project.
  const certFile = join(tmp, 'cert.pem');
  const keyFile = join(tmp, 'key.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', keyFile, '-out', certFile,
    '-days', '1', '-subj', '/CN=fcm.googleapis.com', '-addext', 'subjectAltName=DNS:fcm.googleapis.com,DNS:api.push.apple.com'], { stdio: 'pipe' });
  const apnsKey = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const p8 = join(tmp, `AuthKey_${KEY_ID}.p8`);
  writeFileSync(p8, apnsKey.privateKey.export({ type: 'pkcs8', format: 'pem' }));
  const pub = join(tmp, 'apns-pub.pem');
  writeFileSync(pub, apnsKey.publicKey.export({ type: 'spki', format: 'pem' }));
  const serviceAccount = join(tmp, 'firebase.json');
  writeFileSync(serviceAccount, JSON.stringify({ type: 'service_account', project_id: PROJECT }));

  const spawnChild = (args, env) => {
    const c = spawn(process.execPath, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(c);
    c.on('exit', () => children.delete(c));
    let out = '';
    c.stdout.on('data', (d) => (out = (out + d).slice(-20_000)));
    c.stderr.on('data', (d) => (out = (out + d).slice(-20_000)));
    return { child: c, out: () => out };
  };
  const waitFor = async (what, check, ms = 15_000) => {
    for (let i = 0; i < ms / 50; i++) {
      const v = await check();
      if (v) return v;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`timed out waiting for ${what}`);
  };

  const fakes = spawnChild([fileURLToPath(import.meta.url)], { BENCH_ROLE: 'fakes', BENCH_CERT: certFile, BENCH_KEY: keyFile, BENCH_APNS_PUB: pub });
  const [fcmPort, apnsPort] = await waitFor('the fakes', () => /READY (\d+) (\d+)/.exec(fakes.out())?.slice(1).map(Number));

  const relayPort = await freePort();
  const config = join(tmp, 'config.json');
  writeFileSync(config, JSON.stringify({
    server: { host: '127.0.0.1', port: relayPort },
    log: { level: 'warn', format: 'json' },
    store: 'sqlite',
    dataDir: join(tmp, 'data'),
    sinks: {
      android: { type: 'fcm', serviceAccount },
      ios: { type: 'apns', topic: TOPIC, keyFile: p8, keyId: KEY_ID, teamId: TEAM_ID },
    },
    routes: [
      { match: { platform: 'android_rn' }, sinks: ['android'] },
      { match: { platform: 'apple_rn' }, sinks: ['ios'] },
    ],
  }));
  const nodeArgs = (process.env.BENCH_RELAY_NODE_ARGS || '').split(' ').filter(Boolean);
  const relay = spawnChild([...nodeArgs, '--import', fileURLToPath(import.meta.url), join(ROOT, 'dist', 'src', 'cli.js'), 'serve', '--config', config], {
    BENCH_ROLE: 'seam', BENCH_CERT: certFile, BENCH_FCM_PORT: String(fcmPort), BENCH_APNS_PORT: String(apnsPort),
  });
  await waitFor('the relay', async () => {
    try {
      return (await fetch(`http://127.0.0.1:${relayPort}/healthz`)).ok;
    } catch {
      return false;
    }
  });

  // wrk against the FCM fake: firebase-admin's request, answers must be 200.
  const fcmBody = JSON.stringify({ message: { token: 'f69tFnb0tLBqBYszRNBZNQ:APA91bo-bench', data: { type: 'message', message: 'hello' }, android: { priority: 'high' } } });
  const fcmLua = join(tmp, 'fcm.lua');
  writeFileSync(fcmLua, `
local threads = {}
wrk.method = "POST"
wrk.body = ${JSON.stringify(fcmBody)}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-token"
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0 bad = 0 end
function response(status, headers, body) if status == 200 then ok = ok + 1 else bad = bad + 1 end end
function done(summary, latency, requests)
  local t_ok, t_bad = 0, 0
  for _, t in ipairs(threads) do t_ok = t_ok + t:get("ok") t_bad = t_bad + t:get("bad") end
  io.write(string.format('BENCH_RESULT {"duration_us":%d,"ok":%d,"bad_status":%d,"bad_body":0,"lat_p50_us":%d,"lat_p99_us":%d}\\n',
    summary.duration, t_ok, t_bad, latency:percentile(50), latency:percentile(99)))
end
`);

  let run = 0;
  const wrk = (url, script, seconds, payload) =>
    new Promise((resolvePromise, reject) => {
      const c = spawn('/usr/bin/wrk', [`-c${CONNS}`, `-t${THREADS}`, `-d${seconds}s`, '--timeout', '5s', '-s', script, url], {
        env: { ...process.env, BENCH_PAYLOAD: payload ?? '', BENCH_RUN: String(++run) },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      children.add(c);
      let out = '';
      c.stdout.on('data', (d) => (out += d));
      c.stderr.on('data', (d) => (out += d));
      c.on('error', reject);
      c.on('exit', () => {
        children.delete(c);
        const m = /^BENCH_RESULT (\{.*\})$/m.exec(out);
        if (!m) return reject(new Error(`wrk gave no result:\n${out.slice(-1500)}`));
        const r = JSON.parse(m[1]);
        resolvePromise({ rate: r.ok / (r.duration_us / 1e6), p50: r.lat_p50_us / 1000, p99: r.lat_p99_us / 1000, bad: (r.bad_status ?? 0) + (r.bad_body ?? 0) + (r.err_timeout ?? 0), sample: r.sample_bad });
      });
    });

  // HTTP/2 load against the APNs fake: CONNS streams in flight on one session, as the sink keeps them.
  const { providerToken } = await import(pathToFileURL(join(ROOT, 'dist', 'sinks', 'apns.js')).href);
  const apnsToken = providerToken(apnsKey.privateKey, KEY_ID, TEAM_ID, Date.now());
  const apnsBody = readFileSync(join(ROOT, 'test', 'fixtures', 'golden', 'apns', '02-dm-full.json'), 'utf8');
  const apnsPayload = JSON.stringify(JSON.parse(apnsBody).body);
  const h2load = (seconds) =>
    new Promise((resolvePromise, reject) => {
      const session = http2Connect('https://api.push.apple.com', { createConnection: () => tlsConnect({ host: '127.0.0.1', port: apnsPort, servername: 'api.push.apple.com', ca: readFileSync(certFile), ALPNProtocols: ['h2'] }) });
      session.on('error', reject);
      const latencies = [];
      let bad = 0;
      const end = performance.now() + seconds * 1000;
      const started = performance.now();
      const one = () =>
        new Promise((done) => {
          const t0 = performance.now();
          const s = session.request({ ':method': 'POST', ':path': '/3/device/12c9c2c096789379fc0b74352e89f21b154ce91c05d740086fe0ab1e365dca90', 'apns-topic': TOPIC, 'apns-push-type': 'alert', 'apns-priority': '10', authorization: `bearer ${apnsToken}` });
          s.on('response', (h) => {
            if (h[':status'] !== 200) bad++;
          });
          s.on('data', () => {});
          s.on('close', () => {
            latencies.push(performance.now() - t0);
            done();
          });
          s.end(apnsPayload);
        });
      const worker = async () => {
        while (performance.now() < end) await one();
      };
      Promise.all(Array.from({ length: CONNS }, worker)).then(() => {
        const took = (performance.now() - started) / 1000;
        session.close();
        latencies.sort((a, b) => a - b);
        const pct = (p) => latencies[Math.min(latencies.length - 1, Math.floor((p / 100) * latencies.length))];
        resolvePromise({ rate: (latencies.length - bad) / took, p50: pct(50), p99: pct(99), bad });
      }, reject);
    });

  const relayUrl = `http://127.0.0.1:${relayPort}/api/v1/send_push`;
  const post = join(HERE, 'post.lua');
  const payloads = join(ROOT, 'test', 'fixtures', 'payloads');
  const TARGET_RUN = {
    'fcm-direct': (s) => wrk(`https://127.0.0.1:${fcmPort}/v1/projects/${PROJECT}/messages:send`, fcmLua, s),
    'fcm-relay': (s) => wrk(relayUrl, post, s, join(payloads, '01-channel-post-full.json')),
    'apns-direct': (s) => h2load(s),
    'apns-relay': (s) => wrk(relayUrl, post, s, join(payloads, '02-dm-full.json')),
  };
  // CPU seconds a process has used (utime + stime, /proc/<pid>/stat): per push, a figure the
  // other programs on a shared machine do not distort the way they distort rates and latencies.
  const cpuOf = (pid) => {
    try {
      const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
      return (Number(f[11]) + Number(f[12])) / 100;
    } catch {
      return NaN;
    }
  };
  const measured = async (t, s) => {
    const before = [cpuOf(relay.child.pid), cpuOf(fakes.child.pid)];
    const r = await TARGET_RUN[t](s);
    const pushes = r.rate * s;
    r.relayCpuMs = ((cpuOf(relay.child.pid) - before[0]) * 1000) / pushes;
    r.fakeCpuMs = ((cpuOf(fakes.child.pid) - before[1]) * 1000) / pushes;
    return r;
  };
  const results = Object.fromEntries(TARGETS.filter((t) => TARGET_RUN[t]).map((t) => [t, []]));
  console.log(`bench/providers: ${cpus().length} cores, load ${loadavg().map((l) => l.toFixed(1)).join(' ')}; ${ROUNDS} rounds, -c${CONNS}, ${WARMUP}+${SECONDS} s each`);
  for (let round = 1; round <= ROUNDS; round++) {
    for (const t of Object.keys(results)) {
      if (WARMUP) await TARGET_RUN[t](WARMUP);
      const r = await measured(t, SECONDS);
      results[t].push(r);
      console.log(`  round ${round} ${t.padEnd(11)} ${r.rate.toFixed(0).padStart(6)} /s  p50 ${r.p50.toFixed(2)} ms  p99 ${r.p99.toFixed(2)} ms  cpu/push: relay ${r.relayCpuMs.toFixed(3)} ms, fakes ${r.fakeCpuMs.toFixed(3)} ms${r.bad ? `  NOT OK: ${r.bad}${r.sample ? ` (${r.sample})` : ''}` : ''}`);
    }
  }
  const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const fig = (t) => (results[t] ? { rate: median(results[t].map((r) => r.rate)), p99: median(results[t].map((r) => r.p99)), bad: results[t].reduce((a, r) => a + r.bad, 0) } : undefined);
  let failed = false;
  console.log('\nmedians:');
  for (const [p, goal] of [['fcm', 3000], ['apns', 5000]]) {
    const direct = fig(`${p}-direct`);
    const viaRelay = fig(`${p}-relay`);
    if (!viaRelay) continue;
    const added = direct ? viaRelay.p99 - direct.p99 : NaN;
    failed ||= viaRelay.bad > 0;
    const mark = (ok) => (ok ? 'met' : 'MISSED');
    console.log(`  ${p.toUpperCase().padEnd(4)} relay ${viaRelay.rate.toFixed(0)} pushes/s (goal >= ${goal}: ${mark(viaRelay.rate >= goal)}), p99 ${viaRelay.p99.toFixed(2)} ms` +
      (direct ? `; fake direct ${direct.rate.toFixed(0)} /s, p99 ${direct.p99.toFixed(2)} ms; p99 added ${added.toFixed(2)} ms (goal <= 20: ${mark(added <= 20)})` : '') +
      `${viaRelay.bad ? `; ${viaRelay.bad} answers not OK` : ''}`);
  }

  // A graceful stop, so that e.g. BENCH_RELAY_NODE_ARGS=--cpu-prof can write its profile.
  relay.child.kill('SIGTERM');
  await waitFor('the relay to stop', () => relay.child.exitCode !== null || relay.child.signalCode !== null, 15_000).catch(() => {});
  if (TARGETS.includes('sdk')) await sdkCompare({ SECONDS, CONNS, fcmPort, certFile });
  cleanup();
  process.exit(failed ? 1 : 0);
}

/** firebase-admin send() per message vs sendEach() in batches of CONNS, same fake, same agent. */
async function sdkCompare({ SECONDS, CONNS, fcmPort, certFile }) {
  const { initializeApp, deleteApp } = await import('firebase-admin/app');
  const { getMessaging } = await import('firebase-admin/messaging');
  const ca = readFileSync(certFile);
  class FakeAgent extends Agent {
    createConnection(o) {
      return tlsConnect({ ...o, host: '127.0.0.1', port: fcmPort, servername: 'fcm.googleapis.com', ca });
    }
  }
  const credential = { getAccessToken: async () => ({ access_token: 'bench-token', expires_in: 3600 }) };
  const message = (i) => ({ token: `token-${i}`, data: { type: 'message', message: 'hello' }, android: { priority: 'high' } });
  const measure = async (label, legacy, loop) => {
    const app = initializeApp({ projectId: PROJECT, credential, httpAgent: new FakeAgent({ keepAlive: true }) }, `bench-${label}-${Date.now()}`);
    const m = getMessaging(app);
    if (legacy) m.enableLegacyHttpTransport();
    const end = performance.now() + SECONDS * 1000;
    const started = performance.now();
    let sent = 0;
    await loop(m, end, (n) => (sent += n));
    const rate = sent / ((performance.now() - started) / 1000);
    await deleteApp(app);
    return rate;
  };
  const perMessage = await measure('send', false, (m, end, count) =>
    Promise.all(Array.from({ length: CONNS }, async (_, w) => {
      for (let i = 0; performance.now() < end; i++) {
        await m.send(message(w * 1e6 + i));
        count(1);
      }
    })));
  const batched = await measure('sendEach', true, async (m, end, count) => {
    for (let i = 0; performance.now() < end; i++) {
      const r = await m.sendEach(Array.from({ length: CONNS }, (_, j) => message(i * CONNS + j)));
      count(r.successCount);
    }
  });
  console.log(`\nfirebase-admin, ${CONNS} in flight, ${SECONDS} s each: send() per message ${perMessage.toFixed(0)} msgs/s; ` +
    `sendEach(${CONNS}) legacy HTTP/1.1 ${batched.toFixed(0)} msgs/s (x${(batched / perMessage).toFixed(2)})`);
}
