// A sink that only logs what it would deliver: for trying routes before wiring real sinks.
// It logs routing fields at its level; the message text only at debug (STYLE.md §6).
import { z } from 'zod';
import { shortToken } from '../src/contract.js';
import { sinkSchema } from '../src/schema.js';
import { defineSink } from './types.js';

const schema = sinkSchema('log', {
  level: z.enum(['debug', 'info', 'warn']).default('info'),
});

export default defineSink({
  type: 'log',
  schema,
  create: (name, config, { logger: log }) => ({
    name,
    type: 'log',
    perDevice: false,
    reasons: [['delivered', '']],
    async start() {},
    state: () => ({ ready: true, state: 'ready' }),
    async send(n) {
      log[config.level](
        {
          type: n.type,
          sub_type: n.sub_type,
          platform: n.platform,
          device: shortToken(n.device_id),
          ack_id: n.ack_id,
          team_id: n.team_id,
          channel_id: n.channel_id,
          channel_name: n.channel_name,
          sender_name: n.sender_name,
          message_length: n.message?.length ?? 0,
        },
        'notification',
      );
      log.debug({ ack_id: n.ack_id, message: n.message }, 'notification text');
      return { kind: 'delivered' };
    },
    async close() {},
  }),
});
