// Bounded waiting: every loop in the tests ends by count and by time.
import { connect } from 'node:net';

/** Thrown from an `until` check to stop waiting at once (e.g. the process being waited on died). */
export class GiveUp extends Error {}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Polls `check` every `intervalMs` until it returns a truthy value; throws `what` after `timeoutMs`. */
export async function until<T>(
  what: string,
  check: () => T | Promise<T>,
  { timeoutMs = 5000, intervalMs = 25 }: { timeoutMs?: number; intervalMs?: number } = {},
): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (let i = 0; i < Math.ceil(timeoutMs / intervalMs) + 1; i++) {
    try {
      const v = await check();
      if (v) return v as NonNullable<T>;
    } catch (err) {
      if (err instanceof GiveUp) throw err;
      last = err;
    }
    if (Date.now() >= deadline) break;
    await sleep(intervalMs);
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ''}`);
}

/** True when something accepts a TCP connection on 127.0.0.1:port within `timeoutMs`. */
export function accepts(port: number, timeoutMs = 500): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port });
    const done = (ok: boolean) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
  });
}
