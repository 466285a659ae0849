// "Answered OK" means "will be delivered" (issue 3): a broker that dies, a relay that is
// SIGKILLed, a sink that refuses, resends of the same notification — on the embedded SQLite
// store and on a shared PostgreSQL, with real mosquitto brokers and real relay processes.
import { execFile } from 'node:child_process';
import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { get, post } from './helpers/http.js';
import { haveMosquitto, startMosquitto } from './helpers/mosquitto.js';
import { subscribe, type Subscriber } from './helpers/mqtt.js';
import { messagePush, payload } from './helpers/payloads.js';
import { createDatabase, havePostgres } from './helpers/postgres.js';
import { CLI, runCli, spawnRelay, startTestRelay } from './helpers/relay.js';
import { tempDir } from './helpers/tmp.js';
import { GiveUp, sleep, until } from './helpers/wait.js';

const run = promisify(execFile);
const mosquitto = haveMosquitto();
const postgres = await havePostgres();

type StoreCase = { name: string; enabled: boolean; store: () => Promise<string> };
const STORES: StoreCase[] = [
  { name: 'sqlite', enabled: mosquitto, store: async () => 'sqlite' },
  { name: 'postgres', enabled: mosquitto && postgres, store: createDatabase },
];

let seq = 0;
/** A message push with a fresh ack_id, so each one is told apart at the subscriber. */
function push(): { ackId: string; body: string } {
  const ackId = `ack${process.pid}x${seq++}`;
  return { ackId, body: JSON.stringify(messagePush({ ack_id: ackId })) };
}

function jsonSink(url: string) {
  return { type: 'mqtt', url, format: 'json', topic: 'mm/json', reconnectMin: '100ms', reconnectMax: '400ms' };
}

const FAST_RETRY = { deadline: '700ms', retryMin: '100ms', retryMax: '500ms' };

/** ack_id -> how many times it arrived. */
function arrivals(sub: Subscriber): Map<string, number> {
  const seen = new Map<string, number>();
  for (const m of sub.messages) {
    const id = (JSON.parse(m.payload.toString('utf8')) as { ack_id: string }).ack_id;
    seen.set(id, (seen.get(id) ?? 0) + 1);
  }
  return seen;
}

async function waitForAll(sub: Subscriber, ok: Set<string>, timeoutMs = 20_000, diagnose?: () => Promise<string>) {
  try {
    await until(`all ${ok.size} notifications answered OK to arrive`, () => [...ok].every((id) => arrivals(sub).has(id)), {
      timeoutMs,
      intervalMs: 100,
    });
  } catch (err) {
    const seen = arrivals(sub);
    const missing = [...ok].filter((id) => !seen.has(id));
    throw new Error(
      `${(err as Error).message}: ${missing.length} missing (${missing.slice(0, 5).join(', ')}), ${seen.size} arrived\n${diagnose ? await diagnose() : ''}`,
    );
  }
  const seen = arrivals(sub);
  return { duplicates: [...seen.values()].reduce((a, n) => a + n - 1, 0), seen };
}

/**
 * The value of a series on /metrics: `name` or `name{label="value",...}`, the name matched
 * exactly and the labels given matched among the series' own; several matching series are
 * summed. Throws when no series matches, so a renamed or missing series fails the test
 * instead of reading as 0 (GiveUp: an `until` polling it stops at once).
 */
function metric(text: string, selector: string): number {
  const want = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?$/.exec(selector);
  if (!want) throw new GiveUp(`not a series selector: ${selector}`);
  const [, name, wantLabels = ''] = want;
  const labels = (s: string) => [...s.matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map(([, k, v]) => `${k}=${v}`);
  const needed = labels(wantLabels);
  let found = 0;
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = labels(m[2] ?? '');
    if (!needed.every((l) => have.includes(l))) continue;
    found++;
    sum += Number(m[3]);
  }
  if (found === 0) throw new GiveUp(`no series ${selector} on /metrics`);
  return sum;
}

for (const sc of STORES) {
  describe.skipIf(!sc.enabled)(`durable delivery on ${sc.name}`, () => {
    it('delivers every notification answered OK while the broker is killed and restarted mid-stream', async () => {
      const broker = await startMosquitto({ persistent: true });
      const sub = await subscribe(broker.url, 'mm/#', { session: `dur-sub-${sc.name}-${process.pid}` });
      const relay = await startTestRelay({
        store: await sc.store(),
        dataDir: tempDir(),
        delivery: FAST_RETRY,
        sinks: { j: jsonSink(broker.url) },
      });
      const ok = new Set<string>();
      const failed: string[] = [];
      const send = async () => {
        const p = push();
        const r = await post(`${relay.url}/api/v1/send_push`, p.body);
        if (r.status === 200 && (r.json as { status: string }).status === 'OK') ok.add(p.ackId);
        else failed.push(r.text);
      };
      // 4 posting lanes, ~40 posts each phase: before, during and after the outage.
      const phase = async () => Promise.all([0, 1, 2, 3].map(async () => {
        for (let i = 0; i < 10; i++) await send();
      }));
      await phase();
      const stream = phase();
      await broker.kill();
      await stream;
      await phase();
      await broker.restart();
      await phase();

      expect(failed).toEqual([]);
      expect(ok.size).toBe(160);
      const { duplicates } = await waitForAll(sub, ok, 20_000, async () =>
        (await get(`${relay.url}/metrics`)).text
          .split('\n')
          .filter((l) => /^push_relay_(outbox|sink_outcomes|sink_ready|dead|dupl)/.test(l) && !/ 0$/.test(l))
          .join('\n') + `\nbroker log: ${broker.log.slice(-10).join(' | ')}`,
      );
      const text = (await get(`${relay.url}/metrics`)).text;
      console.log(
        `[${sc.name}] broker outage: ${ok.size} answered OK, all arrived; duplicates at the subscriber: ${duplicates}; ` +
          `queued: ${metric(text, 'push_relay_outbox_enqueued_total')}, relay-counted duplicates: ${metric(text, 'push_relay_duplicates_delivered_total')}`,
      );
      await until('the outbox to drain', async () => metric((await get(`${relay.url}/metrics`)).text, 'push_relay_outbox_depth') === 0);
      await relay.stop();
    });

    it('loses nothing answered OK when the relay is SIGKILLed with deliveries pending, and resumes on restart', async () => {
      const broker = await startMosquitto();
      const sub = await subscribe(broker.url, 'mm/#');
      const dataDir = tempDir();
      const config = { store: await sc.store(), delivery: FAST_RETRY, sinks: { j: jsonSink(broker.url) } };
      const env = { PUSH_RELAY_DATA_DIR: dataDir };
      const first = await spawnRelay({ config, env });
      // A hung broker: publishes get no PUBACK, deliveries pass their deadline and go to the outbox.
      broker.pause();
      const ok = new Set<string>();
      const sendTo = async (url: string) => {
        const p = push();
        try {
          const r = await post(`${url}/api/v1/send_push`, p.body, { timeoutMs: 5000 });
          if ((r.json as { status?: string } | undefined)?.status === 'OK') ok.add(p.ackId);
        } catch {
          /* the relay died under this request: it never answered OK */
        }
      };
      await Promise.all(Array.from({ length: 30 }, () => sendTo(first.url)));
      expect(ok.size).toBe(30);
      // More posts, and the SIGKILL lands among them.
      const inFlight = Array.from({ length: 20 }, (_, i) => sleep(i * 20).then(() => sendTo(first.url)));
      await sleep(200);
      await first.kill();
      await Promise.all(inFlight);
      broker.resume();

      const second = await spawnRelay({ config, env });
      const { duplicates } = await waitForAll(sub, ok);
      console.log(`[${sc.name}] relay SIGKILL: ${ok.size} answered OK, all arrived after restart; duplicates: ${duplicates}`);
      await second.stop();
    });

    it('delivers a resent notification once within the dedup window, but every test push', async () => {
      const broker = await startMosquitto();
      const sub = await subscribe(broker.url, 'mm/#');
      const relay = await startTestRelay({ store: await sc.store(), dataDir: tempDir(), sinks: { j: jsonSink(broker.url) } });
      const p = push();
      const test = payload('11').text;
      for (let i = 0; i < 3; i++) {
        expect((await post(`${relay.url}/api/v1/send_push`, p.body)).json).toEqual({ status: 'OK' });
        expect((await post(`${relay.url}/api/v1/send_push`, test)).json).toEqual({ status: 'OK' });
      }
      await sub.waitFor(4);
      await sleep(300);
      const seen = arrivals(sub);
      expect(seen.get(p.ackId)).toBe(1);
      expect(seen.get('')).toBe(3);
      expect(metric((await get(`${relay.url}/metrics`)).text, 'push_relay_duplicates_suppressed_total')).toBe(2);
      await relay.stop();
    });

    it('spills to the outbox beyond the sink\'s concurrency cap and queue instead of waiting, and delivers it all', async () => {
      const broker = await startMosquitto();
      const sub = await subscribe(broker.url, 'mm/#');
      const relay = await startTestRelay({
        store: await sc.store(),
        dataDir: tempDir(),
        delivery: { ...FAST_RETRY, deadline: '3s', concurrency: 2, queue: 1 },
        sinks: { j: jsonSink(broker.url) },
      });
      // A hung broker holds the two slots and the one queue place for the whole deadline.
      broker.pause();
      const ok = new Set<string>();
      const started = Date.now();
      const replies = await Promise.all(
        Array.from({ length: 10 }, async () => {
          const p = push();
          const r = await post(`${relay.url}/api/v1/send_push`, p.body);
          if ((r.json as { status: string }).status === 'OK') ok.add(p.ackId);
          return Date.now() - started;
        }),
      );
      // 7 of 10 were answered at once (spilled), not after the 3 s deadline.
      expect(replies.filter((ms) => ms < 1500).length).toBe(7);
      const text = (await get(`${relay.url}/metrics`)).text;
      expect(metric(text, 'push_relay_sink_outcomes_total{sink="j",outcome="queued",reason="backpressure"}')).toBe(7);
      broker.resume();
      expect(ok.size).toBe(10);
      await waitForAll(sub, ok);
      await relay.stop();
    });

    it('shows, retries and purges the outbox from the command line', async () => {
      const broker = await startMosquitto();
      const config = { store: await sc.store(), dataDir: tempDir(), delivery: { ...FAST_RETRY, retryMin: '1h', retryMax: '1h' }, sinks: { j: jsonSink(broker.url) } };
      const file = join(tempDir(), 'config.json');
      writeFileSync(file, JSON.stringify(config));
      const relay = await startTestRelay(config);
      await broker.stop();
      await until('the sink to notice the broker is gone', async () => (await get(`${relay.url}/readyz`)).status === 503);
      const ids = [push(), push(), push()];
      for (const p of ids) expect((await post(`${relay.url}/api/v1/send_push`, p.body)).json).toEqual({ status: 'OK' });
      await relay.stop();

      const stats = await runCli(['outbox', 'stats', '--config', file]);
      expect(stats.stdout).toMatch(/^outbox: 3 pending/m);
      expect(stats.stdout).toMatch(/^ {2}j: 3$/m);
      const list = await runCli(['outbox', 'list', '--config', file]);
      for (const p of ids) expect(list.stdout).toContain(`ack_id=${p.ackId}`);
      expect((await runCli(['outbox', 'retry', '--config', file])).stdout).toMatch(/^3 deliveries due now/m);
      const refused = await runCli(['outbox', 'purge', '--config', file]);
      expect(refused.code).toBe(2); // a usage error (src/cli.ts fail()), not a crash (1)
      expect(refused.stderr).toContain('--yes');
      expect((await runCli(['outbox', 'purge', '--yes', '--config', file])).stdout).toMatch(/^3 deliveries deleted/m);
      expect((await runCli(['outbox', 'stats', '--config', file])).stdout).toMatch(/^outbox: 0 pending/m);
    });

    it('turns a delivery that outlives its time to live into a dead letter saying so', async () => {
      const broker = await startMosquitto();
      const config = { store: await sc.store(), dataDir: tempDir(), sinks: { j: { ...jsonSink(broker.url), ttl: '1s' } } };
      const file = join(tempDir(), 'config.json');
      writeFileSync(file, JSON.stringify(config));
      const relay = await startTestRelay(config);
      await broker.stop();
      await until('the sink to notice the broker is gone', async () => (await get(`${relay.url}/readyz`)).status === 503);
      const p = push();
      expect((await post(`${relay.url}/api/v1/send_push`, p.body)).json).toEqual({ status: 'OK' });
      // The gauge is the age of what waits, in seconds: after 50 ms it cannot read 0 while
      // the delivery waits, nor more than the seconds this test has run.
      await sleep(50);
      const queued = (await get(`${relay.url}/metrics`)).text;
      expect(metric(queued, 'push_relay_outbox_depth{sink="j"}')).toBe(1);
      expect(metric(queued, 'push_relay_outbox_oldest_age_seconds')).toBeGreaterThanOrEqual(0.05);
      expect(metric(queued, 'push_relay_outbox_oldest_age_seconds')).toBeLessThan(5);
      expect(metric(queued, 'push_relay_dead_letters')).toBe(0);
      await until('the expired delivery to become a dead letter', async () => {
        const text = (await get(`${relay.url}/metrics`)).text;
        return metric(text, 'push_relay_outbox_depth{sink="j"}') === 0 && metric(text, 'push_relay_dead_letters') === 1;
      }, { timeoutMs: 8000, intervalMs: 200 });
      // Nothing waits any more: the oldest-age gauge is back to 0, not the dead letter's age.
      expect(metric((await get(`${relay.url}/metrics`)).text, 'push_relay_outbox_oldest_age_seconds')).toBe(0);
      await relay.stop();
      const listed = await runCli(['dead-letters', 'list', '--config', file]);
      expect(listed.stdout).toContain(`ack_id=${p.ackId}`);
      expect(listed.stdout).toMatch(/reason: expired: time to live passed/);
    });

    it('gives up after the attempt budget and keeps a dead letter with the last error', async () => {
      const broker = await startMosquitto();
      const config = {
        store: await sc.store(),
        dataDir: tempDir(),
        delivery: { deadline: '300ms', retryMin: '50ms', retryMax: '100ms' },
        sinks: { j: { ...jsonSink(broker.url), maxAttempts: 2 } },
      };
      const file = join(tempDir(), 'config.json');
      writeFileSync(file, JSON.stringify(config));
      const relay = await startTestRelay(config);
      // Connected but silent: every attempt, first and retried, runs into its deadline.
      broker.pause();
      const p = push();
      expect((await post(`${relay.url}/api/v1/send_push`, p.body)).json).toEqual({ status: 'OK' });
      await until('the delivery to be given up on', async () => metric((await get(`${relay.url}/metrics`)).text, 'push_relay_dead_letters_total{sink="j"}') === 1, {
        timeoutMs: 8000,
        intervalMs: 100,
      });
      // Attempt 1 at request time ran into its deadline and went to the outbox; attempt 2,
      // the outbox's, was the last of the budget: given up on, not scheduled again.
      const text = (await get(`${relay.url}/metrics`)).text;
      expect(metric(text, 'push_relay_outbox_enqueued_total{sink="j"}')).toBe(1);
      expect(metric(text, 'push_relay_outbox_retries_total{sink="j"}')).toBe(0);
      expect(metric(text, 'push_relay_sink_outcomes_total{sink="j",outcome="queued",reason="deadline"}')).toBe(1);
      broker.resume();
      await relay.stop();
      const listed = await runCli(['dead-letters', 'list', '--config', file]);
      expect(listed.stdout).toContain(`ack_id=${p.ackId}`);
      expect(listed.stdout).toMatch(/attempts=2/);
      expect(listed.stdout).toMatch(/reason: gave up after 2 attempts: no answer within 300 ms/);
    });

    it('keeps a notification the broker refuses as a dead letter, and replays it once the broker is fixed', async () => {
      // mosquitto drops root for its own user, which must be able to read the ACL file.
      const aclDir = tempDir();
      chmodSync(aclDir, 0o755);
      const acl = join(aclDir, 'acl');
      writeFileSync(acl, 'topic read mm/#\n', { mode: 0o644 });
      const broker = await startMosquitto({ extra: [`acl_file ${acl}`] });
      const sub = await subscribe(broker.url, 'mm/#');
      const config = {
        store: await sc.store(),
        dataDir: tempDir(),
        delivery: FAST_RETRY,
        sinks: { j: { ...jsonSink(broker.url), protocolVersion: 5 } },
      };
      const relay = await spawnRelay({ config, env: { PUSH_RELAY_DATA_DIR: config.dataDir } });
      const file = join(tempDir(), 'config.json');
      writeFileSync(file, JSON.stringify(config));
      const p = push();
      const r = await post(`${relay.url}/api/v1/send_push`, p.body);
      expect(r.json).toMatchObject({ status: 'FAIL', error: expect.stringMatching(/j: .*not authorized/i) });

      const listed = await run(process.execPath, [CLI, 'dead-letters', 'list', '--config', file]);
      expect(listed.stdout).toContain(`ack_id=${p.ackId}`);
      expect(listed.stdout).toMatch(/reason: permanent failure: .*not authorized/i);

      // The operator fixes the ACL and replays.
      writeFileSync(acl, 'topic readwrite mm/#\n');
      broker.reload();
      await sleep(300);
      const replayed = await run(process.execPath, [CLI, 'dead-letters', 'replay', '--all', '--config', file]);
      expect(replayed.stdout).toMatch(/^1 dead letters back in the outbox/m);
      await waitForAll(sub, new Set([p.ackId]), 10_000);
      const after = await run(process.execPath, [CLI, 'dead-letters', 'list', '--config', file]);
      expect(after.stdout).toContain('no dead letters');
      await relay.stop();
    });
  });
}

describe.skipIf(!(mosquitto && postgres))('several relays sharing one PostgreSQL store', () => {
  it('delivers each queued notification exactly once when two relay processes drain the same outbox', async () => {
    const broker = await startMosquitto({ persistent: true });
    // Register a persistent session, then take the broker down: everything posted now queues.
    const session = `shared-sub-${process.pid}`;
    const early = await subscribe(broker.url, 'mm/#', { session });
    await early.close();
    await broker.stop();
    // A deadline long enough for a publish on a loaded machine: this test is about two relays
    // never claiming the same row, and a publish that outlives a short deadline is resent by
    // design (at least once), which would show as a duplicate that is not the store's.
    const config = { store: await createDatabase(), delivery: { ...FAST_RETRY, deadline: '5s' }, sinks: { j: jsonSink(broker.url) } };
    const relays = await Promise.all([spawnRelay({ config }), spawnRelay({ config })]);
    const ok = new Set<string>();
    await Promise.all(
      Array.from({ length: 4 }, async (_, lane) => {
        for (let i = 0; i < 50; i++) {
          const p = push();
          const r = await post(`${relays[(lane + i) % 2]!.url}/api/v1/send_push`, p.body);
          if ((r.json as { status: string }).status === 'OK') ok.add(p.ackId);
        }
      }),
    );
    expect(ok.size).toBe(200);

    await broker.restart();
    const sub = await subscribe(broker.url, 'mm/#', { session });
    const { duplicates, seen } = await waitForAll(sub, ok);
    await sleep(500);
    const drained = await Promise.all(relays.map(async (r) => metric((await get(`${r.url}/metrics`)).text, 'push_relay_outbox_delivered_total')));
    console.log(`[postgres] two relays: ${ok.size} queued, drained ${drained.join(' + ')}, duplicates: ${duplicates}`);
    expect(duplicates).toBe(0);
    expect(seen.size).toBe(200);
    expect(drained[0]! + drained[1]!).toBe(200);
    await Promise.all(relays.map((r) => r.stop()));
  });
});
