// A sink's `tls.ca`: extra certificate authorities to trust for its own peer (a private SMTP
// server or webhook), read once when the sink is built; a file that cannot be read stops
// start-up with the sink and the path named.
import { readFileSync } from 'node:fs';

export function readTlsCa(sink: string, path: string | undefined): Buffer | undefined {
  if (!path) return undefined;
  try {
    return readFileSync(path);
  } catch (err) {
    throw new Error(`sink ${sink}: cannot read tls.ca ${path}: ${(err as Error).message}`);
  }
}
