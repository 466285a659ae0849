// SIGTERM while deliveries hang (contract §0.5: Mattermost never retries, so a request the
// relay accepted must get an answer): every request in flight gets a contract reply, the
// process exits 0, and what was answered OK is on the broker.
import { Agent } from 'node:http';
import { afterEach, describe, expect, it } from 'vitest';
import { get, post, type Reply } from './helpers/http.js';
import { haveMosquitto, startMosquitto, type Mosquitto } from './helpers/mosquitto.js';
import { subscribe } from './helpers/mqtt.js';
import { messagePush } from './helpers/payloads.js';
import { spawnRelay } from './helpers/relay.js';
import { sleep, until } from './helpers/wait.js';

const N = 40;

function pushes(tag: string) {
  return Array.from({ length: N }, (_, i) =>
    messagePush({ ack_id: `${tag}x${String(i).padStart(3, '0')}`.padEnd(26, '0'), message: `shutdown ${tag} #${i} 🚀` }),
  );
}

/** Waits until the relay has taken in `n` message pushes (counted before any sink is tried). */
async function received(url: string, n: number) {
  await until(`${n} notifications received by the relay`, async () => {
    const m = /^push_relay_notifications_received_total\{type="message"\} (\d+)$/m.exec((await get(`${url}/metrics`)).text);
    return Number(m?.[1]) >= n;
  }, { timeoutMs: 5000, intervalMs: 25 });
}

function expectContractReply(r: PromiseSettledResult<Reply>, i: number): Reply {
  expect(r.status, `request ${i}: ${r.status === 'rejected' ? String(r.reason) : ''}`).toBe('fulfilled');
  const reply = (r as PromiseFulfilledResult<Reply>).value;
  expect(reply.status, `request ${i}`).toBe(200);
  const body = reply.json as { status: string; error?: unknown };
  if (body.status === 'FAIL') expect(body.error, `request ${i}`).toEqual(expect.any(String));
  else expect(body, `request ${i}`).toEqual({ status: 'OK' });
  return reply;
}

describe.skipIf(!haveMosquitto())('shutting down with deliveries in flight', () => {
  let broker: Mosquitto | undefined;
  afterEach(async () => {
    broker?.resume();
    await broker?.stop();
  });

  it.each(['none', 'sqlite'])(
    'with store: %s, answers every one of 40 requests in flight at SIGTERM, exits 0, and what was answered OK is on the broker',
    async (store) => {
      broker = await startMosquitto();
      const sub = await subscribe(broker.url, 'mm/#');
      const relay = await spawnRelay({
        config: {
          store,
          delivery: { deadline: '3s' },
          sinks: { notif: { type: 'mqtt', url: broker.url, topic: 'mm/_notif', format: 'message' } },
        },
      });

      broker.pause();
      const sent = pushes(store);
      // Keep-alive connections, as Mattermost's Go client uses.
      const agent = new Agent({ keepAlive: true, maxSockets: N });
      const replies = Promise.allSettled(sent.map((p) => post(`${relay.url}/api/v1/send_push`, JSON.stringify(p), { agent })));
      await received(relay.url, N);
      const exit = relay.stop('SIGTERM', 15_000);
      await sleep(300);
      broker.resume();

      const settled = await replies;
      agent.destroy();
      const ok = settled.map(expectContractReply).flatMap((r, i) => ((r.json as { status: string }).status === 'OK' ? [sent[i]!.message as string] : []));
      expect(await exit).toEqual({ code: 0, signal: null });

      // Paused for ~300 ms against a 3 s deadline: every one should have made it.
      expect(ok).toHaveLength(N);
      const got = (await sub.waitFor(ok.length)).map((m) => m.payload.toString('utf8'));
      expect(got.sort()).toEqual([...ok].sort());
      await sub.close();
    },
  );

  // A hung broker must not hang the shutdown: server.shutdownTimeout bounds it.
  it('answers FAIL naming the sink when the broker stays hung past the deadline, and still exits 0 within server.shutdownTimeout', async () => {
    broker = await startMosquitto();
    const relay = await spawnRelay({
      config: {
        store: 'none',
        server: { shutdownTimeout: '2s' },
        delivery: { deadline: '1s' },
        sinks: { notif: { type: 'mqtt', url: broker.url, topic: 'mm/_notif', format: 'message' } },
      },
    });

    broker.pause();
    const replies = Promise.allSettled(pushes('hung').map((p) => post(`${relay.url}/api/v1/send_push`, JSON.stringify(p))));
    await received(relay.url, N);
    const exit = relay.stop('SIGTERM', 8_000);

    const settled = await replies;
    for (const [i, r] of settled.entries()) {
      const reply = expectContractReply(r, i);
      expect(reply.json, `request ${i}`).toEqual({ status: 'FAIL', error: expect.stringMatching(/^notif: .*1000 ms/) });
    }
    expect(await exit).toEqual({ code: 0, signal: null });
  });
});
