// What the benchmark scripts share: a free port, and a scratch directory whose child
// processes are killed and files removed when the script exits. Everything binds 127.0.0.1
// unless told otherwise.
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** A port nothing listens on right now, on `host`. */
export function freePort(host = '127.0.0.1') {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, host, () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/**
 * A directory in os.tmpdir() for one run, and the set its child processes go in: on exit
 * (and on Ctrl-C) they are killed and the directory removed, so a run leaves nothing behind.
 */
export function scratch(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const children = new Set();
  const cleanup = () => {
    for (const c of children) c.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  };
  process.on('exit', cleanup);
  process.on('SIGINT', () => process.exit(130));
  return { dir, children, cleanup };
}
