// HTTP the way Mattermost's push client does it (contract §0.2): a POST with a JSON body and
// *no* Content-Type, User-Agent `Mattermost-Bot/1.1`. node:http rather than fetch, because
// fetch adds `content-type: text/plain` to string bodies.
import { request as httpRequest, type Agent, type IncomingHttpHeaders } from 'node:http';

export type Reply = {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
  text: string;
  /** The parsed body, or undefined when it is not JSON. */
  json: unknown;
};

export type RequestOptions = {
  headers?: Record<string, string>;
  timeoutMs?: number;
  /** Send the body with Transfer-Encoding: chunked and no Content-Length. */
  chunked?: boolean;
  /** E.g. a keep-alive agent, as Mattermost's Go client keeps connections; default: none. */
  agent?: Agent;
};

export const MATTERMOST_UA = 'Mattermost-Bot/1.1';

export function post(url: string, body: string | Uint8Array, opts: RequestOptions = {}): Promise<Reply> {
  return request('POST', url, body, opts);
}

export function get(url: string, opts: RequestOptions = {}): Promise<Reply> {
  return request('GET', url, undefined, opts);
}

export function request(method: string, url: string, body?: string | Uint8Array, opts: RequestOptions = {}): Promise<Reply> {
  const bytes = body === undefined ? undefined : typeof body === 'string' ? Buffer.from(body, 'utf8') : Buffer.from(body);
  const headers: Record<string, string> = { 'User-Agent': MATTERMOST_UA, ...opts.headers };
  if (bytes && !opts.chunked) headers['Content-Length'] = String(bytes.length);
  if (bytes && opts.chunked) headers['Transfer-Encoding'] = 'chunked';
  const timeoutMs = opts.timeoutMs ?? 15_000;
  return new Promise((resolve, reject) => {
    // agent: false -> a fresh connection per request, nothing pooled across tests.
    const req = httpRequest(url, { method, headers, agent: opts.agent ?? false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () => {
        const buf = Buffer.concat(chunks);
        const text = buf.toString('utf8');
        let json: unknown;
        try {
          json = JSON.parse(text);
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: buf, text, json });
      });
    });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`${method} ${url}: no reply within ${timeoutMs} ms`)));
    req.on('error', (err: NodeJS.ErrnoException) => reject(new Error(`${method} ${url}: ${err.code ?? ''} ${err.message}`)));
    if (bytes && opts.chunked) {
      // Several chunks, so a server cannot learn the size before reading.
      for (let i = 0; i < bytes.length; i += 64 * 1024) req.write(bytes.subarray(i, i + 64 * 1024));
      req.end();
    } else {
      req.end(bytes);
    }
  });
}
