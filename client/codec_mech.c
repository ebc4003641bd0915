/* p11p client — codec for CK_MECHANISM: [type, param]. A parameter of a mechanism listed
 * in protocol/mechanisms.spec travels field by field (encoders generated into
 * gen/mech_params.c); any other parameter travels as plain bytes, so no mechanism is
 * hidden from the application. */
#include "codec.h"

static const struct p11p_mech_param *find_param(CK_MECHANISM_TYPE type)
{
	for (size_t i = 0; i < p11p_mech_params_count; i++) {
		if (p11p_mech_params[i].type == type)
			return &p11p_mech_params[i];
	}
	return NULL;
}

void p11p_put_mechanism(struct p11p_call *c, const CK_MECHANISM *m)
{
	const struct p11p_mech_param *d;

	if (m == NULL) {
		p11p_put_nil(c);
		return;
	}
	p11p_put_array(c, 2);
	p11p_put_ulong(c, m->mechanism);
	if (m->pParameter == NULL) {
		p11p_put_nil(c);
		return;
	}
	d = find_param(m->mechanism);
	if (d == NULL)
		p11p_put_bin(c, m->pParameter, m->ulParameterLen);
	else if (m->ulParameterLen != d->size)
		p11p_fail(c, CKR_MECHANISM_PARAM_INVALID);
	else if (!c->err)
		d->put(c, m->pParameter);
}

int p11p_mech_names_object(CK_MECHANISM_TYPE type)
{
	const struct p11p_mech_param *d = find_param(type);

	return d != NULL && d->objects;
}
