// One relay per SQLite data directory: a second relay on the same directory would free the
// first one's leases and deliver the same outbox rows again. Run as users run it: child
// processes, a SIGKILL included (the lock must not outlive the process that held it).
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { post } from './helpers/http.js';
import { messagePush } from './helpers/payloads.js';
import { runCli, spawnRelay } from './helpers/relay.js';
import { tempDir } from './helpers/tmp.js';

const config = { store: 'sqlite', sinks: { log: { type: 'log' } } };

describe('the SQLite data directory', () => {
  it('refuses a second relay on a directory in use, serves the CLI meanwhile, and frees it when the first is killed', async () => {
    const dataDir = tempDir('push-relay-data-');
    const env = { PUSH_RELAY_DATA_DIR: dataDir };
    const first = await spawnRelay({ config, env });

    const second = await spawnRelay({ config, env, waitReady: false });
    expect((await second.exited).code).toBe(1);
    expect(second.lines.join('\n')).toMatch(`data directory ${dataDir} is in use by another running push-relay`);

    // The first relay goes on, and the outbox commands still read the store beside it.
    const reply = await post(`${first.url}/api/v1/send_push`, JSON.stringify(messagePush({ ack_id: 'lock0000000000000000000001' })));
    expect(reply.text).toBe('{"status":"OK"}');
    const file = join(tempDir('push-relay-config-'), 'config.json');
    writeFileSync(file, JSON.stringify({ ...config, dataDir }));
    const stats = await runCli(['outbox', 'stats', '--config', file]);
    expect(stats.code, stats.stderr).toBe(0);
    expect(stats.stdout).toMatch(/0 pending/);

    await first.kill();
    const third = await spawnRelay({ config, env });
    const again = await post(`${third.url}/api/v1/send_push`, JSON.stringify(messagePush({ ack_id: 'lock0000000000000000000002' })));
    expect(again.text).toBe('{"status":"OK"}');
    expect(await third.stop()).toEqual({ code: 0, signal: null });
  });
});
