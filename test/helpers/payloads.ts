// The sample payloads in test/fixtures/payloads (its README names each case and its contract
// section), generated to match what Mattermost's Go marshalling puts on the wire.
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const PAYLOAD_DIR = resolve(REPO_ROOT, 'test', 'fixtures', 'payloads');

export type SamplePayload = {
  /** File name, e.g. `01-channel-post-full.json`. */
  name: string;
  /** The file as it is: the exact bytes Mattermost would post. */
  text: string;
  json: Record<string, unknown> & {
    platform: string;
    device_id: string;
    server_id: string;
    type?: string;
    message?: string;
    channel_name?: string;
  };
};

export function loadPayloads(): SamplePayload[] {
  const names = readdirSync(PAYLOAD_DIR).filter((f) => f.endsWith('.json')).sort();
  if (names.length !== 12) throw new Error(`expected 12 sample payloads in ${PAYLOAD_DIR}, found ${names.length}`);
  return names.map((name) => {
    const text = readFileSync(join(PAYLOAD_DIR, name), 'utf8');
    return { name, text, json: JSON.parse(text) as SamplePayload['json'] };
  });
}

export function payload(prefix: string): SamplePayload {
  const found = loadPayloads().find((p) => p.name.startsWith(prefix));
  if (!found) throw new Error(`no sample payload named ${prefix}*`);
  return found;
}

/** A valid message push built from sample 01 with some fields replaced (or removed with undefined). */
export function messagePush(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  const out: Record<string, unknown> = { ...payload('01').json, ...overrides };
  for (const [k, v] of Object.entries(overrides)) if (v === undefined) delete out[k];
  return out;
}
